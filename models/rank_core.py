"""The ranker in one compiled call: query weights, votes, candidates, blend, filters, picks, reasons' data.

:func:`infogap.models.ranker.rank` used to spend more time between its kernels than in them: a dozen numpy
calls to weigh the recent items, a kernel call each for the votes, the top candidates, the pick and
the reasons, the arrays passed between them, and for many requests a second round (too few voted
candidates, or the category cap relaxed: the trending items join) or the content component of a
user with few items. :func:`rank_core` does all of that in one call of :func:`_core`, built from the
same kernels (:mod:`infogap.models.votes`, :mod:`infogap.models.selection`) in the order the module docstring of
:mod:`infogap.models.ranker` describes. Only two things go back to Python: the trending lists, asked for
(and then passed in) when a request needs them, and the ids a request excludes, whose rows are
blocked and the request run again when one was picked. The call that asks for the trending lists
keeps the request's votes in scratch arrays, and the next call starts from them: on the synthetic
stream of ``infogap bench`` most requests need the lists, and their second call summed the same
~8,000 neighbour slots again. While most requests need them, they are passed from the first call.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from infogap.models.candidate_sources import proposals
from infogap.models.cooccurrence import pair_lift
from infogap.models.scratch import scratch
from infogap.models.selection import PARTS, _choose, _why
from infogap.models.votes import MOMENTUM_RESOLUTION_S, _anchors, _dense, _MomentumMemo, _positions, _top, _votes

#: rows of the packed result (one float64 array, written into a buffer the thread reuses: a new array
#: per request cost more to return than to fill); the whole numbers DOMINANT ... ANCHOR_TYPE side by
#: side, read as ints in one conversion (a lift can exceed int64)
PICK, SCORE, DOMINANT, ANCHOR_ROW, COUNT, ANCHOR_TYPE, LIFT = range(7)
#: what :func:`_core` answers besides picks: done (without the trending lists, or with them joined), or
#: "call again with the trending lists"
_DONE, _JOINED, _NEED_TRENDING = 0, 1, 2
#: the category share's code among the parts of a score (:data:`infogap.models.selection.PARTS`)
_CONTENT = PARTS.index("content")


@njit(cache=True, nogil=True)
def _union(cand, a, b):  # pragma: no cover - compiled
    """``np.unique`` of the three row arrays."""
    return np.unique(np.concatenate((cand, a, b)))


@njit(cache=True, nogil=True)
def _votes_on(cand, rows, votes, pos):  # pragma: no cover - compiled
    """The votes of the candidates ``cand``, read from ``votes`` of ``rows`` (0 for a candidate without);
    ``pos`` is all zero over the catalog, and left so."""
    for t in range(rows.size):
        pos[rows[t]] = t + 1
    out = np.zeros(cand.size)
    for i in range(cand.size):
        p = pos[cand[i]]
        if p > 0:
            out[i] = votes[p - 1]
    for t in range(rows.size):
        pos[rows[t]] = 0
    return out


@njit(cache=True, nogil=True)
def _add_sources(cand, extra, src, pos):  # pragma: no cover - compiled
    """Add the sources' weighted scores (``src``: rows, scores, codes) to the candidates' ``extra`` (the
    category share); returns per candidate the part that gave most of it (its source's code, or
    :data:`_CONTENT`)."""
    part = np.full(cand.size, _CONTENT, np.int64)
    best = extra.copy()
    for i in range(cand.size):
        pos[cand[i]] = i + 1
    for t in range(src.shape[1]):
        p = pos[np.int64(src[0, t])]
        score = src[1, t]
        if p > 0:
            extra[p - 1] += score
            if score > best[p - 1]:
                best[p - 1] = score
                part[p - 1] = np.int64(src[2, t])
    for i in range(cand.size):
        pos[cand[i]] = 0
    return part


@njit(cache=True, nogil=True)
def _core(nb, sq, block, ipop, pop, vals, users, min_users, raw_pop, dec_scale, raw_scale, mom_count, mom_decay, pop_decay, momentum,
          available, category, consumed, blocked, u, hist_item, hist_ts, hist_type, hist_w, ring, qs_tab, qd_tab, kd,
          gap_floor, inv_tau, dislike, w_cooc, seg_row, w_seg, glob, w_glob, share, w_content, src, trend_a,
          trend_b, have_trending, kk, n, cap, n_anchor, acc, mark, memo, gen, marks, pos, kept_rows, kept_votes,
          n_kept, out, picked):  # pragma: no cover - compiled; tested against a step-by-step reference
    """Writes the picks' columns into ``out`` (rows :data:`PICK` ... :data:`LIFT`, at least ``n``
    columns) and their rows into ``picked``; returns how many, the status and the number of voted items.
    A history entry with a negative weight (a disliked item) votes against its neighbours, ``dislike`` times
    as much as it would for them."""
    k = ring.size  # 0: no votes (no history, or w_cooc 0)
    sq_dir, sq_sym = sq[0], sq[1]
    items = np.empty(k, np.int64)
    ts = np.empty(k)
    for h in range(k):
        items[h] = hist_item[u, ring[h]]
        ts[h] = hist_ts[u, ring[h]]
    g1 = 1.0 - gap_floor
    a_sym = np.empty(k)
    a_dir = np.empty(min(kd, k))
    blocks = np.empty(k, np.int64)
    for h in range(k):
        gap = ts[0] - ts[h]  # an older event that arrived later (within the lateness) counts as the newest
        ip = ipop[items[h]] * (gap_floor + g1 / (1.0 + (gap if gap > 0.0 else 0.0) * inv_tau))
        if hist_w[u, ring[h]] < 0.0:
            ip *= -dislike
        a_sym[h] = qs_tab[h] * ip
        if h < kd:
            a_dir[h] = qd_tab[h] * ip
        blocks[h] = block[items[h]]
    if n_kept >= 0:  # called again for the same request: its votes, kept by the first call
        rows, votes = kept_rows[:n_kept], kept_votes[:n_kept]
    else:
        rows, votes = _votes(nb, sq_dir, sq_sym, blocks, a_sym, a_dir, ipop, mom_count, mom_decay, pop, pop_decay,
                             momentum, available, consumed, acc, mark, memo, gen)
    top = _top(rows, votes, kk)
    cand = rows[top]
    v = votes[top]
    w_c = w_cooc if k > 0 else 0.0
    widened = False
    joined = _DONE
    part = np.empty(0, np.int64)  # which part the extra score of each candidate is mostly (with sources)
    n_src = src.shape[1]  # the sources' proposals: rows, weighted scores, codes
    while True:
        if cand.size < n or widened:  # few co-occurrence candidates (or too few categories): trending joins
            if not have_trending:  # keep the votes for the call with the trending lists
                kept_rows[:rows.size] = rows
                kept_votes[:rows.size] = votes
                return 0, _NEED_TRENDING, rows.size
            cand = _union(cand, trend_a, trend_b)
            joined = _JOINED
            v = _votes_on(cand, rows, votes, pos)  # the votes of the joined candidates (0 for those without)
        if n_src:  # the candidate sources' rows join (infogap.models.candidate_sources)
            merged = np.unique(np.concatenate((cand, src[0].astype(np.int64))))
            if v.size:
                v = _votes_on(merged, cand, v, pos)
            cand = merged
        if not cand.size:
            return 0, joined, rows.size
        content = np.zeros(cand.size if share.size or n_src else 0)
        if share.size:
            for i in range(content.size):
                content[i] = share[category[cand[i]]] * w_content  # category -1 reads the trailing 0
        if n_src:
            part = _add_sources(cand, content, src, pos)
        order, score, keep, relaxed = _choose(cand, v, w_c, seg_row, w_seg, glob, w_glob, content, category,
                                              available, consumed, blocked, n, cap, marks)
        if relaxed and not widened:
            widened = True
            continue
        break
    sel = order[keep]
    picks = cand[sel]
    for i in range(sel.size):
        out[PICK, i] = picks[i]
        picked[i] = picks[i]
        out[SCORE, i] = score[sel[i]]
        out[DOMINANT:, i] = 0.0  # (the buffer is reused: no reasons' data from an earlier request)
    if n_anchor > 0 and sel.size:  # the reasons' data
        if k > 0:
            anchor = _anchors(nb, sq_dir, sq_sym, blocks, a_sym, a_dir, n_anchor, picks, pos, users, min_users)
        else:
            anchor = np.full(sel.size, -1, np.int64)
        types = np.empty(k, np.int64)
        for h in range(k):
            types[h] = hist_type[u, ring[h]]
        dom, a_row, count, n_pair, a_type = _why(sel, cand, v, w_c, seg_row, w_seg, glob, w_glob, content, part,
                                                 anchor, items, types, nb.shape[1], vals, block)
        for i in range(sel.size):
            out[DOMINANT, i] = dom[i]
            out[ANCHOR_ROW, i] = a_row[i]
            out[COUNT, i] = count[i]
            out[ANCHOR_TYPE, i] = a_type[i]
            a = a_row[i]
            if a >= 0:
                out[LIFT, i] = pair_lift(count[i], n_pair[i], pop[a], pop[picks[i]], raw_pop[a], raw_pop[picks[i]],
                                         dec_scale, raw_scale)
    return sel.size, joined, rows.size


def rank_core(state, u: int, cfg, qd_tab: np.ndarray, qs_tab: np.ndarray, sources: tuple, n: int, cap: int, excl,
              explain: bool) -> tuple[np.ndarray, list[int], dict[int, float] | None]:
    """The picks of user row ``u`` packed (rows :data:`PICK` ... :data:`LIFT`, one column per pick,
    best first; the reasons' rows only with ``explain``; a view of this thread's buffer, valid until its
    next request), the picked rows as a list, and the user's category mix when the request computed it
    (else None). ``state``: a :class:`~infogap.models.model_state.ModelState`; ``sources``: the active
    candidate sources (:func:`infogap.models.candidate_sources.active_sources`); ``excl``: a container of
    excluded item ids, or None."""
    co, cat, prof, tr = state.cooc, state.catalog, state.profiles, state.trending
    c = int(prof.n_push[u])  # the user's history entries so far
    k = min(cfg.query_len, c, prof.history_len)
    seg = prof.segment[u]
    seg_row, w_s = _EMPTY, 0.0
    if cfg.w_segment > 0 and seg >= 0 and tr.segment_max[seg] > 0:
        seg_row, w_s = tr.segment_[seg], cfg.w_segment / tr.segment_max[seg]
    glob, w_g = _EMPTY, 0.0
    if cfg.w_global > 0 and tr.global_max > 0:
        glob, w_g = tr.global_, cfg.w_global / tr.global_max
    mix, share = None, _EMPTY
    if cfg.w_content > 0 and k < cfg.content_history:
        mix = prof.mix(u)
        if mix:
            share = np.zeros(cat.n_features + 1)
            share[list(mix)] = list(mix.values())
    sc = scratch("rank_core", max(co.ipop.size, cat.available.size), _Scratch)
    if sc.out.shape[1] < n:
        sc.picks_room(n)
    out, picked = sc.out, sc.picked
    now = state.now
    momentum = float(cfg.momentum)
    moment = (now - now % MOMENTUM_RESOLUTION_S, state.t0, tr.lam_m, co.lam, momentum)  # (nan before any event)
    if sc.moment != moment:  # the momentum decays of this hour (the same for every request in it)
        decays = (state.decay(tr.lam_m, MOMENTUM_RESOLUTION_S), state.decay(co.lam, MOMENTUM_RESOLUTION_S))
        sc.moment, sc.decays, sc.gen = moment, decays, sc.memo.generation((*decays, momentum))
    (mom_decay, pop_decay), gen = sc.decays, sc.gen
    kk = min(len(cat), 3 * n + 10)
    ring = prof.ring_order[c % prof.history_len, :k if cfg.w_cooc > 0 else 0]
    blocked = _NO_ROWS
    trend_a = trend_b = _NO_ROWS
    # When most recent requests needed the trending lists (few voted candidates, or the category cap
    # relaxed), they are passed from the start: that spares the second call (a fifth of a ranking on
    # the bench stream). Not always: they are remembered only until the next learned event, and asked
    # for without need they cost a top-k over the catalog every request of a prequential run (half its speed).
    have_trending = sc.trending_rate > _UPFRONT_RATE
    if have_trending:
        trend_a, trend_b = _trending_rows(sc, tr, kk, seg)
    n_kept = -1  # the votes are computed by the first call, and kept for the next ones of this request
    lift_scales = co.lift_scales() if explain else _NO_LIFT  # (only the reasons cite a lift)
    # the candidate sources' proposals as one argument (rows and codes as floats, exact below 2 ** 53)
    src = np.stack(proposals(state, sources, u, kk)) if sources else _NO_PROPOSALS
    while True:
        n_picked, status, n_voted = _core(
            co.nb, co.sq, co.block, co.ipop, co.pop, co.vals, co.users, co.min_users, co.raw_pop, *lift_scales, tr.momentum_, mom_decay,
            pop_decay, momentum, cat.available, cat.category, prof.consumed(u), blocked, u, prof.hist_item,
            prof.hist_ts, prof.hist_type, prof.hist_w, ring, qs_tab, qd_tab, min(k, cfg.query_dir_len),
            float(cfg.query_gap_floor), 1.0 / cfg.query_gap_tau_s, float(cfg.review_dislike), float(cfg.w_cooc), seg_row,
            float(w_s), glob, float(w_g), share,
            float(cfg.w_content), src, trend_a, trend_b, have_trending, kk, n, cap, _ANCHOR_ROWS if explain else 0,
            sc.acc, sc.mark, sc.memo.table, gen, sc.marks, sc.pos, sc.kept_rows, sc.kept_votes, n_kept, out, picked)
        if status == _NEED_TRENDING:
            n_kept = n_voted
            trend_a, trend_b = _trending_rows(sc, tr, kk, seg)
            have_trending = True
            continue
        picks = picked[:n_picked].tolist()
        if excl:  # excluded ids among the picks: block their rows, pick again
            ids = cat.ids
            if not excl.isdisjoint(map(ids.__getitem__, picks)):
                blocked = np.union1d(blocked, [r for r in picks if ids[r] in excl]).astype(np.int64)
                continue
        sc.trending_rate += 0.05 * ((n_kept >= 0 or status == _JOINED) - sc.trending_rate)
        return out[:, :n_picked], picks, mix


def _trending_rows(sc, tr, kk: int, seg: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``kk`` top rows of the user's segment trending (global when no segment) and of the global
    trending (none when no segment), as writeable copies of the trending's remembered lists, kept while
    those lists are (a read-only array is another numba type: another compilation)."""
    out = []
    for rows in (tr.top(kk, seg if seg >= 0 else None), tr.top(kk) if seg >= 0 else None):
        if rows is None:
            out.append(_NO_ROWS)
            continue
        got = sc.trending.get(id(rows))
        if got is None or got[0] is not rows:
            if len(sc.trending) >= 64:
                sc.trending.clear()
            got = sc.trending[id(rows)] = (rows, np.array(rows))
        out.append(got[1])
    return out[0], out[1]


#: The trending lists go with the first call while more than this share of recent requests needed them.
_UPFRONT_RATE = 0.5
#: Reasons cite the history item, among the most recent ones, that voted most for the item.
_ANCHOR_ROWS = 8
_NO_ROWS = np.zeros(0, np.int64)
_NO_LIFT = (0.0, 0.0)
_NO_PROPOSALS = np.zeros((3, 0))


class _Scratch:
    """This thread's arrays over the catalog for :func:`_core` (one lookup a request instead of four)."""

    def __init__(self, size: int):
        self.acc, self.mark = _dense(size)
        self.memo = _MomentumMemo(size)
        self.marks = np.zeros(size, np.int8)
        self.pos = _positions(size)
        #: a request's votes (rows, values), kept by the call that asks for the trending lists for the next
        self.kept_rows = np.empty(size, np.int64)
        self.kept_votes = np.empty(size)
        self.moment: tuple = ()
        #: of this moment: the momentum decays and the memo's generation for them
        self.decays = (1.0, 1.0)
        self.gen = 0
        #: id of a trending list -> (that list, its writeable copy)
        self.trending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        #: recent share of requests that needed the trending lists
        self.trending_rate = 0.0
        #: the picks' columns of the last request (see :func:`_core`); read before the next request
        self.out = np.zeros((LIFT + 1, 64))
        self.picked = np.zeros(64, np.int64)  # (the PICK row as ints)

    def picks_room(self, n: int) -> None:
        """Widen :attr:`out` and :attr:`picked` to at least ``n`` picks."""
        width = max(n, 2 * self.out.shape[1])
        self.out, self.picked = np.zeros((LIFT + 1, width)), np.zeros(width, np.int64)


_EMPTY = np.zeros(0)
