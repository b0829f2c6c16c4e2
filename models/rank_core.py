"""The ranker's common path in one compiled call: query weights, votes, candidates, blend, picks, reasons' data.

:func:`models.ranker.rank` spent more time between its kernels than in them: a dozen numpy calls to
weigh the recent items, a kernel call each for the votes, the top candidates, the pick and the
reasons, and the arrays passed between them. For a request that needs nothing else (the user has
history, enough voted candidates, no category cap relaxed, no content component) this module does
all of it in one call, with the same kernels in the same order, so the result is the one the
step-by-step path gives; any other request returns ``None`` and the ranker takes its general path.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from models.scratch import scratch
from models.selection import _choose, _why
from models.votes import MOMENTUM_RESOLUTION_S, _anchors, _dense, _MomentumMemo, _positions, _top, _votes

#: rows of the packed result (one float64 array: one boxing instead of seven)
PICK, SCORE, DOMINANT, ANCHOR_ROW, COUNT, LIFT, ANCHOR_TYPE = range(7)


@njit(cache=True, nogil=True)
def _core(nb, sq_dir, sq_sym, block, ipop, pop, vals, total, pair_total, mom_count, mom_decay, pop_decay, momentum,
          available, category, consumed, hist_item, hist_ts, hist_type, ring, qs_tab, qd_tab, kd, gap_floor, inv_tau,
          w_cooc, seg_row, w_seg, glob, w_glob, kk, n, cap, n_anchor, acc, mark, m_factor, m_count, m_pop, m_gen,
          gen, marks, pos):  # pragma: no cover - compiled; tested against the general path
    k = ring.size
    items = np.empty(k, np.int64)
    ts = np.empty(k)
    for h in range(k):
        items[h] = hist_item[ring[h]]
        ts[h] = hist_ts[ring[h]]
    g1 = 1.0 - gap_floor
    a_sym = np.empty(k)
    a_dir = np.empty(kd)
    blocks = np.empty(k, np.int64)
    for h in range(k):
        ip = ipop[items[h]] * (gap_floor + g1 / (1.0 + (ts[0] - ts[h]) * inv_tau))
        a_sym[h] = qs_tab[h] * ip
        if h < kd:
            a_dir[h] = qd_tab[h] * ip
        blocks[h] = block[items[h]]
    rows, votes = _votes(nb, sq_dir, sq_sym, blocks, a_sym, a_dir, ipop, mom_count, mom_decay, pop, pop_decay,
                         momentum, available, consumed, acc, mark, m_factor, m_count, m_pop, m_gen, gen)
    top = _top(rows, votes, kk)
    out = np.zeros((7, 0))
    if top.size < n:
        return out, False
    cand = rows[top]
    v = votes[top]
    order, score, keep, relaxed = _choose(cand, v, w_cooc, seg_row, w_seg, glob, w_glob, np.zeros(0), category,
                                          available, consumed, np.zeros(0, np.int64), n, cap, marks)
    if relaxed:
        return out, False
    sel = order[keep]
    out = np.zeros((7, sel.size))
    for i in range(sel.size):
        out[PICK, i] = cand[sel[i]]
        out[SCORE, i] = score[sel[i]]
    if n_anchor > 0:  # the reasons' data
        picks = cand[sel]
        anchor = _anchors(nb, sq_dir, sq_sym, blocks, a_sym, a_dir, n_anchor, picks, pos)
        types = np.empty(k, np.int64)
        for h in range(k):
            types[h] = hist_type[ring[h]]
        dom, a_row, count, n_pair, a_type = _why(sel, cand, v, w_cooc, seg_row, w_seg, glob, w_glob, np.zeros(0),
                                                 anchor, items, types, nb.shape[1], vals, block)
        scale = total * total / (2.0 * pair_total) if pair_total > 0 else 0.0
        for i in range(sel.size):
            out[DOMINANT, i] = dom[i]
            out[ANCHOR_ROW, i] = a_row[i]
            out[COUNT, i] = count[i]
            out[ANCHOR_TYPE, i] = a_type[i]
            if a_row[i] >= 0:
                out[LIFT, i] = n_pair[i] * scale / max(pop[a_row[i]] * pop[picks[i]], 1e-300)
    return out, True


def rank_core(engine, u: int, k: int, cfg, qd_tab: np.ndarray, qs_tab: np.ndarray, n: int, cap: int,
              n_anchor: int) -> np.ndarray | None:
    """The packed picks of user row ``u`` (rows :data:`PICK` ... :data:`ANCHOR_TYPE`, one column per
    pick, best first), or None when the request needs the general path. ``n_anchor`` 0: no reasons."""
    co, cat, prof, tr = engine._cooc, engine._catalog, engine._profiles, engine._trending
    seg = prof.segment[u]
    seg_row, w_s = _EMPTY, 0.0
    if cfg.w_segment > 0 and seg >= 0 and tr.segment_max[seg] > 0:
        seg_row, w_s = tr.segment_[seg], cfg.w_segment / tr.segment_max[seg]
    glob, w_g = _EMPTY, 0.0
    if cfg.w_global > 0 and tr.global_max > 0:
        glob, w_g = tr.global_, cfg.w_global / tr.global_max
    sc = scratch("rank_core", max(co.ipop.size, cat.available.size), _Scratch)
    memo = sc.memo
    mom_decay, pop_decay = engine._decay(tr.lam_m, MOMENTUM_RESOLUTION_S), engine._decay(co.lam, MOMENTUM_RESOLUTION_S)
    momentum = float(cfg.momentum)
    gen = memo.generation((mom_decay, pop_decay, momentum))
    c = prof.n_push[u]
    out, ok = _core(co.nb, co.sq[0], co.sq[1], co.block, co.ipop, co.pop, co.vals, float(co.total),
                    float(co.pair_total), tr.momentum_, mom_decay, pop_decay, momentum, cat.available, cat.category,
                    prof.consumed(u), prof.hist_item[u], prof.hist_ts[u], prof.hist_type[u],
                    engine._ring_idx[c % prof.history_len, :k], qs_tab, qd_tab, min(k, cfg.query_dir_len),
                    float(cfg.query_gap_floor), 1.0 / cfg.query_gap_tau_s, float(cfg.w_cooc), seg_row, float(w_s),
                    glob, float(w_g), min(len(cat), 3 * n + 10), n, cap, n_anchor, sc.acc, sc.mark, memo.factor,
                    memo.count, memo.pop, memo.gen, gen, sc.marks, sc.pos)
    return out if ok else None


class _Scratch:
    """This thread's arrays over the catalog for :func:`_core` (one lookup a request instead of four)."""

    def __init__(self, size: int):
        self.acc, self.mark = _dense(size)
        self.memo = _MomentumMemo(size)
        self.marks = np.zeros(size, np.int8)
        self.pos = _positions(size)


_EMPTY = np.zeros(0)
