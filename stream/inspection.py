"""What a worker holds about one user, one item and the segments, as JSON for the console (read-only).

Routes on the worker's HTTP server (beside ``/health``, ``/metrics``, ``/stats``), guarded by
:mod:`infogap.stream.web_access`:

- ``GET /inspect/users/{user_id}`` (or ``/inspect/users?id=``, for any id): 404 unless this worker holds the user (its partition is here); else the
  decayed profile (RFM, top categories, events), the recent items, the segment, the experiment variant and the
  push preferences (consent per channel, time zone, quiet hours). ``user_id`` is the id as kept: the
  pseudonym when pseudonymisation is on (the console computes it).
- ``GET /inspect/items/{item_id}`` (or ``?id=``): the catalog entry and the item's trending rank, overall and per segment
  (among the top :data:`TRENDING_DEPTH`); 404 for an item the catalog does not hold.
- ``GET /inspect/segments``: every segment with the users held here and what characterises it.

Nothing here writes state, and nothing is computed from input beyond a lookup by id.
"""
from __future__ import annotations

from aiohttp import web

#: trending ranks are looked up among the top this many items (overall and per segment)
TRENDING_DEPTH = 100


def _json(body, status: int = 200) -> web.Response:
    import orjson

    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def add_routes(app: web.Application, worker) -> None:
    """Add the ``/inspect`` routes reading ``worker``'s user stage (a :class:`~infogap.stream.worker.Worker`)."""

    async def user(request: web.Request) -> web.Response:
        user_id = request.match_info.get("user_id") or request.query.get("id", "")
        core, engine = worker.core, worker.engine
        held = [p for p, part in core.parts.items() if user_id in part.users]
        if not held or not engine.known_user(user_id) or (core.erasures and core.erasures.erased(user_id)):
            return _json({"error": "this worker holds no such user"}, 404)
        prefs = core.prefs.get(user_id)
        return _json({"user_id": user_id, "partition": held[0], "profile": engine.profile(user_id),
                      "recent": engine.recent_items(user_id, 10),
                      "variant": core.experiment.assign(user_id) if core.experiment else None,
                      "experiment": core.exp_name,
                      "prefs": None if prefs is None else {"consent": dict(prefs.consent), "timezone": prefs.timezone,
                                                            "quiet_hours": prefs.quiet_hours}})

    async def item(request: web.Request) -> web.Response:
        item_id = request.match_info.get("item_id") or request.query.get("id", "")
        engine = worker.engine
        entry = engine.item(item_id)
        if entry is None:
            return _json({"error": "no such item in the catalog"}, 404)

        def rank(segment):
            ranked = [i for i, _ in engine.trending(TRENDING_DEPTH, segment)]
            return ranked.index(item_id) + 1 if item_id in ranked else None

        segments = [s["segment"] for s in engine.segments()]
        return _json({"item": entry, "trending_rank": rank(None),
                      "segment_ranks": {str(s): rank(s) for s in segments}, "trending_depth": TRENDING_DEPTH})

    async def segments(_request: web.Request) -> web.Response:
        return _json(segments_view(worker.engine))

    app.router.add_get("/inspect/users/{user_id:[^/]+}", user)
    app.router.add_get("/inspect/users", user)  # ?id=: any id, "." and ".." too
    app.router.add_get("/inspect/items/{item_id:[^/]+}", item)
    app.router.add_get("/inspect/items", item)
    app.router.add_get("/inspect/segments", segments)


def segments_view(engine) -> dict:
    """The answer of ``/inspect/segments``: every segment as the engine holds it (:meth:`Engine.segments`), the users
    held, and each review topic with its top words (none before the topic model has learned)."""
    return {"segments": engine.segments(), "users": len(engine.state.profiles),
            "topics": engine.topics.describe(6) if engine.topics.n_learned else []}
