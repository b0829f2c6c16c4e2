"""One learned item event in one compiled call: its trending, occurrence, pairs and history entry.

After :meth:`infogap.models.engine.Engine.learn_one` has updated the user's profile in Python, the rest
of an event that enters the user's history touches only arrays: the item's event count, its
global, segment and momentum popularity (and their maxima), its occurrence count and popularity
normaliser, the pairs with the user's recent items, and the ring-buffer entry. Done as five calls
between Python and numpy, that cost ~3 us of a prequential ``learn_one``'s ~26; :func:`learn_event`
does it in one compiled call. It defines none of these steps: it calls the compiled step of each
part, the one its batch path runs too (:func:`infogap.models.trending.count_trend`,
:func:`infogap.models.cooccurrence.count_occurrence`, the pair updates of
:class:`~infogap.models.cooccurrence.PairWeights` and the slot update, :func:`infogap.models.profile.write_entry`),
so the state is bit-identical to the batch path of ``learn_many`` (which a test checks).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from infogap.models.cooccurrence import _learn_one, count_occurrence
from infogap.models.privacy import NO_USER, mask
from infogap.models.profile import write_entry
from infogap.models.scratch import forget_memo, scratch
from infogap.models.trending import count_trend


@njit(cache=True, nogil=True)
def _learn_event(u, i, s, x, xm, ts, w, typ, rating, scale, neg_exponent, bit, ring, global_max, total, item_events,
                 momentum, glob, seg_scores, segment_max, trend_users, pop, ipop, raw_pop, hist_item, hist_ts, hist_w,
                 hist_type, hist_rating, feat_mask, dtab, stab, gap_tau_s, gap_floor, agree, boost, pair_total, block, nb,
                 vals, sq, users, fill, free_pos, n_free, table, meta, door, door_bits, n_evict, evict_sym_weight,
                 vote_min_users, j, codes_out, deltas_out, bits_out):  # pragma: no cover - compiled; tested against the batch path
    """Returns the new maxima and totals, and where the pair updates stopped (see ``_update``); when
    they stopped early, the updates are left in ``codes_out``/``deltas_out`` for Python to go on with.
    ``bits_out``: room for the updates' user bits (every one the user's; a scratch array, not one made per event)."""
    item_events[i] += 1
    ubit = mask(bit)
    global_max = count_trend(i, s, x, xm, ubit, momentum, glob, seg_scores, segment_max, trend_users, global_max)
    total = count_occurrence(i, scale, pop, ipop, raw_pop, total, neg_exponent)
    codes, deltas, k, pt, need = _learn_one(i, ts, w, scale, rating, feat_mask[i], ring, hist_item[u], hist_ts[u],
                                            hist_w[u], hist_rating[u], feat_mask, dtab, stab, gap_tau_s, gap_floor,
                                            agree, boost, bit, pair_total, block, nb, vals, sq, users, fill,
                                            free_pos, n_free, table, meta, door, door_bits, n_evict, evict_sym_weight,
                                            vote_min_users, bits_out)
    write_entry(hist_item, hist_ts, hist_w, hist_type, hist_rating, u, j, i, ts, w, typ, rating)
    if k < codes.size:
        codes_out[:codes.size] = codes
        deltas_out[:codes.size] = deltas
    return global_max, total, codes.size, k, pt, need


def learn_event(state, pairs, window: int, u: int, i: int, s: int, x: float, xm: float, ts: float, w: float, c: int,
                typ: int, scale: float, rating: float, bit: int = NO_USER) -> None:
    """Learn, into a :class:`~infogap.models.model_state.ModelState`, user row ``u``'s event on item row ``i``
    that enters the history as its ``c``-th entry: trending weight ``x`` (momentum ``xm``) in segment ``s``
    (-1: none), pair weight ``w`` against the user's last ``window`` entries (weighed by ``pairs``, a
    :class:`~infogap.models.cooccurrence.PairWeights`), type code ``typ``, occurrence ``scale``
    (``exp(lambda (ts - t0))``) and ``rating`` (0: none); ``bit``: the user's bit (0..63,
    :mod:`infogap.models.privacy`), ORed into the bitmaps of the item's trending entries and of every pair. For
    an engine that learns its pairs itself (``cooc="local"``); the profile is already updated."""
    prof, co, tr = state.profiles, state.cooc, state.trending
    head = c % prof.history_len
    slots = co.slot_arrays()
    forget_memo(tr)  # the trending top lists
    codes, deltas, bits = scratch("learn_event", 2 * window, _out)
    tr.global_max, co.total, n, k, pt, need = _learn_event(
        u, i, s, x, xm, float(ts), w, typ, float(rating), scale, -co.pop_exponent, bit,
        prof.ring_order[head, :min(window, c)], tr.global_max, co.total, state.item_events, tr.momentum_,
        tr.global_, tr.segment_, tr.segment_max, tr.users_, co.pop, co.ipop, co.raw_pop, prof.hist_item, prof.hist_ts, prof.hist_w,
        prof.hist_type, prof.hist_rating, state.catalog.feat_mask, pairs.dtab, pairs.stab, float(pairs.gap_tau_s),
        float(pairs.gap_floor), float(pairs.agreement), float(pairs.feature_boost), co.pair_total, *slots, head, codes,
        deltas, bits)
    if k < n:  # stopped for a block or index room
        co.finish_update(codes[:n].copy(), deltas[:n].copy(), bits[:n].copy(), k, pt, need)
    else:
        co.pair_total = pt
    co.raw_total += 1.0  # the raw counts lift is computed on (two updates per pair)
    co.raw_pair_total += n // 2


def _out(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Room for the slot updates of an event whose updates stopped early, and for their user bits."""
    return np.zeros(size, np.int64), np.zeros((size, 4)), np.zeros(size, np.uint8)
