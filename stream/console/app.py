"""The console: server-rendered pages over the workers and the store, refreshed in place; read-only.

Routes: ``/`` (overview), ``/users/{user_id}`` (and ``/users?q=`` to look one up), ``/items/{item_id}``,
``/segments``, ``/experiments``, ``/dlq``. Each page refreshes its live part every ``console_refresh_s``:
``static/console.js`` asks the same URL with ``X-Fragment: 1`` and swaps the part in. No script from
elsewhere: Content-Security-Policy allows this origin's script and style only. Every string shown goes
through Jinja2's autoescape; charts are SVG drawn here (:mod:`infogap.stream.console.charts`).

Bound to 127.0.0.1 by default; bound elsewhere it refuses to start without ``INFOGAP_CONSOLE_TOKEN``, then asks
every request for it (basic auth: any user name, the token as the password).
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import jinja2
from aiohttp import web
from markupsafe import Markup

from infogap.models.experiments import Counts, Figures, hidden_cells, summarize, verdict
from infogap.models.retention import summarize as retention_summary
from infogap.models.push_policy import RULES
from infogap.stream import web_access
from infogap.stream.console import charts
from infogap.stream.console.sources import KafkaUnavailable, Sources, summed
from infogap.stream.settings import Settings
from infogap.stream.store import StoreUnavailable

log = logging.getLogger("infogap.console")
HERE = Path(__file__).parent

#: what each push rule means, for a person
RULE_TEXT = {"sent": "sent", "no_change": "held: no material change of the recommendations",
             "no_consent": "held: no consent for the channel", "quiet_hours": "held: the user's quiet hours",
             "daily_cap": "held: the channel's daily cap is reached", "repeat": "held: every item was pushed recently",
             "too_large": "held: the message is too large", "no_recommendations": "held: nothing to recommend",
             "control_group": "held: the user is in the control group (a ghost push recorded, nothing sent)"}
assert set(RULE_TEXT) == {"sent", *RULES}

SECURITY_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                    "base-uri 'none'",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "Cache-Control": "no-store"}


def _when(ts) -> str:
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):  # not a time, or out of range
        return "-"


def page_of(kind: str, value) -> str:
    """The address of a user's or an item's page: ``/{kind}/{id}`` with the id escaped as one path segment, or
    ``/{kind}?id=`` for ``.`` and ``..`` (which every URL library folds into the path).

    >>> page_of("users", "a b/c"), page_of("items", ".."), page_of("items", "sku-7")
    ('/users/a%20b%2Fc', '/items?id=..', '/items/sku-7')
    """
    value = str(value)
    if value in (".", ".."):
        return f"/{kind}?id={quote(value, safe='')}"
    return f"/{kind}/{quote(value, safe='')}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = _when
    env.filters["user_page"] = lambda v: page_of("users", v)
    env.filters["item_page"] = lambda v: page_of("items", v)
    env.filters["pct"] = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    env.filters["pts"] = lambda v: "-" if v is None else f"{100 * v:+.1f} pts"
    env.filters["num"] = lambda v: "-" if v is None else f"{v:,.2f}"
    env.filters["ci"] = lambda b, pct=False: "" if not b else (
        f"[{100 * b[0]:.1f}%, {100 * b[1]:.1f}%]" if pct else f"[{b[0]:,.2f}, {b[1]:,.2f}]")
    env.globals["rule_text"] = RULE_TEXT
    return env


class Console:
    """The console's aiohttp application (:meth:`app`) over :class:`~infogap.stream.console.sources.Sources`."""

    def __init__(self, settings: Settings, sources: Sources | None = None):
        if not web_access.is_loopback(settings.console_host) and settings.console_token is None:
            raise ValueError(f"the console would be bound to {settings.console_host}, beyond this machine, without a "
                             "login: set INFOGAP_CONSOLE_TOKEN (at least 16 characters), or bind it to 127.0.0.1")
        self.settings = settings
        self.sources = sources or Sources(settings)
        self.env = _environment()
        self._stop = asyncio.Event()
        self._sampler: asyncio.Task | None = None

    def app(self) -> web.Application:
        s = self.settings
        # the headers outermost: on every answer, the login's 401 and redirects included
        app = web.Application(middlewares=[self._headers, web_access.guard(s.console_host, s.console_token)])
        app.router.add_get("/", self.overview)
        app.router.add_get("/users", self.find_user)
        app.router.add_post("/users", self.find_user)  # the search box: the raw id stays out of the address
        app.router.add_get("/users/{user_id:[^/]+}", self.user)
        app.router.add_get("/items", self.find_item)
        app.router.add_post("/items", self.find_item)
        app.router.add_get("/items/{item_id:[^/]+}", self.item)
        app.router.add_get("/segments", self.segments)
        app.router.add_get("/experiments", self.experiments)
        app.router.add_get("/dlq", self.dlq)
        app.router.add_static("/static/", HERE / "static", follow_symlinks=False)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _start(self, _app) -> None:
        await self.sources.start()
        try:
            await self.sources.sampler.sample_once()  # the first page has numbers
        except Exception:  # never keeps the console from starting: the sampler goes on in the background
            log.exception("the first sample of the workers failed")
        self._sampler = asyncio.create_task(self.sources.sampler.run(self._stop))

    async def _cleanup(self, _app) -> None:
        self._stop.set()
        if self._sampler is not None:
            await self._sampler
        await self.sources.close()

    @web.middleware
    async def _headers(self, request: web.Request, handler):
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # redirects, 404, 405: with the same headers
            exc.headers.update(SECURITY_HEADERS)
            raise
        except StoreUnavailable as exc:
            response = self._page(request, "unavailable.html", "Store unavailable", what="The store",
                                  reason=exc.reason, status=503)
        except KafkaUnavailable as exc:
            response = self._page(request, "unavailable.html", "Kafka unavailable", what="Kafka",
                                  reason=str(exc), status=503)
        response.headers.update(SECURITY_HEADERS)
        return response

    def _page(self, request: web.Request, template: str, title: str, status: int = 200, **context) -> web.Response:
        """The page, or only its live part when the page's script asks (``X-Fragment``)."""
        t0 = time.perf_counter()
        live = Markup(self.env.get_template(template).render(**context))
        if request.headers.get("X-Fragment") == "1":
            return web.Response(text=live, content_type="text/html", status=status)
        html = self.env.get_template("layout.html").render(
            title=title, live=live, path=request.path, refresh_ms=int(self.settings.console_refresh_s * 1000),
            pseudonymised=self.settings.pseudonym_key is not None, render_ms=(time.perf_counter() - t0) * 1000)
        return web.Response(text=html, content_type="text/html", status=status)

    # ------------------------------------------------------------------ pages
    async def overview(self, request: web.Request) -> web.Response:
        src = self.sources
        workers = src.workers
        stream = [w for w in workers if w.kind != "channel"]
        channel = [w for w in workers if w.kind == "channel"]

        def label(w):
            return w.url.split("//", 1)[-1]

        chart = charts.line_chart
        graphs = {
            "events/s": chart([(label(w), w.rate("events_in")) for w in stream], "ev/s"),
            "consumer lag (records)": chart([(label(w), w.series("lag")) for w in stream]),
            "freshness p50 / p99 (ms)": chart([(f"{label(w)} {p}", w.series("freshness_seconds", p, 1000))
                                               for w in stream for p in ("p50", "p99")], "ms"),
            "batch latency p50 / p99 (ms)": chart([(f"{label(w)} {p}", w.series("batch_seconds", p, 1000))
                                                   for w in stream for p in ("p50", "p99")], "ms"),
            "pushes/s": chart([(label(w), w.rate("pushes")) for w in stream], "msg/s"),
            "dead letters/s": chart([(label(w), w.rate("dead_letters")) for w in stream], "rec/s"),
        }
        totals = {key: summed(stream, name) for key, name in
                  (("dlq", "dlq_by_reason"), ("sent", "pushes_by_channel"), ("held", "pushes_held"))}
        redis, kafka = await asyncio.gather(src.redis_ok(), src.kafka_ok())
        return self._page(request, "overview.html", "Overview", graphs=graphs, stream=stream, channel=channel,
                          totals=totals, redis=redis, kafka=kafka, label=label,
                          events=sum(w.last.get("events_in", 0) for w in stream))

    async def _asked(self, request: web.Request) -> str:
        """The id typed in a search box (a form POST, or ``?q=``)."""
        if request.method == "POST":
            form = await request.post()
            return str(form.get("q", "")).strip()[:1000]
        return request.query.get("q", "").strip()[:1000]

    async def find_user(self, request: web.Request) -> web.Response:
        if "id" in request.query:  # the page of an id that cannot be a path segment
            return await self.user(request, request.query["id"])
        q = await self._asked(request)
        if not q:
            return self._page(request, "find.html", "Users", what="user", action="/users")
        raise web.HTTPSeeOther(page_of("users", self.sources.user_id(q)))

    async def user(self, request: web.Request, raw: str | None = None) -> web.Response:
        raw = request.match_info["user_id"] if raw is None else raw
        user_id = self.sources.user_id(raw)
        if user_id != raw:  # a raw id with pseudonymisation on: never kept in the address or the page
            raise web.HTTPSeeOther(page_of("users", user_id))
        data = await self.sources.user(user_id)
        return self._page(request, "user.html", f"User {user_id}", **data)

    async def find_item(self, request: web.Request) -> web.Response:
        if "id" in request.query:
            return await self.item(request, request.query["id"])
        q = await self._asked(request)
        if not q:
            return self._page(request, "find.html", "Items", what="item", action="/items")
        raise web.HTTPSeeOther(page_of("items", q))

    async def item(self, request: web.Request, item_id: str | None = None) -> web.Response:
        data = await self.sources.item(request.match_info["item_id"] if item_id is None else item_id)
        return self._page(request, "item.html", f"Item {data['item_id']}", **data)

    async def segments(self, request: web.Request) -> web.Response:
        data = await self.sources.segments()
        for seg in data["segments"]:
            seg["chart"] = charts.line_chart([("users", seg["history"])], width=260, height=70)
        return self._page(request, "segments.html", "Segments", **data)

    async def experiments(self, request: web.Request) -> web.Response:
        out = []
        k = self.settings.engine_config().min_users  # the privacy floor: a row of fewer users shows no figures
        for name, counts in (await self.sources.experiments()).items():
            by_variant = {k[0]: f for k, f in summarize(counts, by=("variant",)).items()}
            spec = self.settings.experiment or {}
            configured = [str(v) for v in spec.get("variants") or {}] if spec.get("name") == name else []
            for v in configured:  # variants configured that have sent nothing yet are shown too
                by_variant.setdefault(v, Figures.from_counts(Counts()))
            rows = {k: f for k, f in summarize(counts, by=("variant", "campaign", "channel")).items()}
            by_variant = dict(sorted(by_variant.items()))
            variants = list(by_variant)
            # the control: a variant named so, else the first of the configuration (its order is the buckets'),
            # else the first by name
            control = "control" if "control" in by_variant else (configured or variants)[0]
            variants = [control] + [v for v in variants if v != control]
            hidden = hidden_cells(counts, k)
            hidden |= {v for v, f in by_variant.items() if (v,) in hidden or not f.shown(k)}  # (variants by name)
            shown = {v: f for v, f in by_variant.items() if v not in hidden}
            verdicts = list(dict.fromkeys(verdict(control, by_variant[control], v, by_variant[v], metric)
                                          for v in variants[1:] if control in shown and v in shown
                                          for metric in ("ctr", "conversion_rate")))
            out.append({"name": name, "variants": by_variant, "rows": rows, "control": control, "verdicts": verdicts,
                        "hidden": hidden, "min_users": k,
                        "ctr_chart": charts.interval_chart([(v, f.ctr, f.ctr_ci) for v, f in shown.items()], True),
                        "conv_chart": charts.interval_chart([(v, f.conversion_rate, f.conversion_rate_ci)
                                                             for v, f in shown.items()], True)})
        retention = [{"name": name, "min_users": k,
                      "segments": [(f"{variant} {campaign} {channel}", inc,
                                    inc.treated.below_floor(k) or inc.control.below_floor(k))
                                   for (campaign, channel, variant), inc in retention_summary(cohorts).items()]}
                     for name, cohorts in (await self.sources.retention()).items()]
        return self._page(request, "experiments.html", "Experiments", experiments=out, retention=retention)

    async def dlq(self, request: web.Request) -> web.Response:
        tails = await self.sources.dead_letters()
        counts = {topic: dict(Counter(r["code"] for r in rows)) for topic, rows in tails.items() if rows}
        since_start = summed(self.sources.workers, "dlq_by_reason")
        return self._page(request, "dlq.html", "Dead letters", tails=tails, counts=counts, since_start=since_start)


async def run_console(settings: Settings, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve the console until ``stop`` is set (or forever)."""
    console = Console(settings)
    runner = web.AppRunner(console.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.console_host, settings.console_port).start()
    log.info("console on http://%s:%d/", settings.console_host, settings.console_port)
    if ready is not None:
        ready.set()
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()
