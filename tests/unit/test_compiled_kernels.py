"""The compiled kernels against plain Python statements of what they must do."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infogap.models.selection import choose
from infogap.models.slot_table import SlotTable
from infogap.models.votes import Votes


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(st.tuples(st.integers(0, 60), st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.25])),
                          max_size=80, unique_by=lambda x: x[0]),
                 st.lists(st.tuples(st.integers(0, 999), st.sampled_from([0.0, 1.0, 1.0 + 1e-9, 2.0])),  # ties galore
                          min_size=100, max_size=300, unique_by=lambda x: x[0]),
                 st.lists(st.tuples(st.integers(0, 999),  # magnitudes far below the largest: the floor is lowered
                                    st.one_of(st.floats(1e-300, 1e300), st.just(0.0), st.just(5e-324))),
                          min_size=50, max_size=300, unique_by=lambda x: x[0])),
       st.integers(0, 120))
def test_top_keeps_the_largest_positive_votes_lower_rows_first_on_ties(voted, k):
    rows = np.array([r for r, _ in voted], np.int64)
    votes = np.array([v for _, v in voted], np.float64)
    got = Votes(rows, votes).top(k)
    best = sorted((t for t in range(rows.size) if votes[t] > 0), key=lambda t: (-votes[t], rows[t]))[:k]
    assert got.tolist() == sorted(best, key=lambda t: rows[t])


def _choose_reference(cand, score, category, available, had, excl_rows, n, cap):
    order = sorted(range(len(cand)), key=lambda j: (-score[j], j))
    used, out, skipped = {}, [], []
    for j, pos in enumerate(order):
        r = cand[pos]
        if r in had or r in excl_rows or not available[r]:
            continue
        c = category[r]
        if c >= 0:
            if used.get(c, 0) >= cap:
                skipped.append(j)
                continue
            used[c] = used.get(c, 0) + 1
        out.append(j)
        if len(out) == n:
            return [order[j] for j in out], False
    keep = out + skipped[: n - len(out)]
    return [order[j] for j in keep], bool(skipped) and len(out) < n


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_choose_blends_orders_and_applies_filters_and_the_category_cap(data):
    n_items = data.draw(st.integers(1, 30))
    cand = np.array(sorted(data.draw(st.sets(st.integers(0, n_items - 1), min_size=1))), np.int64)
    votes = np.array(data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, 2.5, 4.0]), min_size=cand.size,
                                        max_size=cand.size)))
    seg = np.array(data.draw(st.lists(st.sampled_from([0.0, 1.0, 3.0]), min_size=n_items, max_size=n_items)))
    category = np.array(data.draw(st.lists(st.integers(-1, 3), min_size=n_items, max_size=n_items)), np.int32)
    available = np.array(data.draw(st.lists(st.booleans(), min_size=n_items, max_size=n_items)))
    had = data.draw(st.sets(st.integers(0, n_items - 1)))
    excl_rows = data.draw(st.sets(st.integers(0, n_items - 1)))
    n = data.draw(st.integers(1, 12))
    share = data.draw(st.sampled_from([0.2, 0.5, 1.0]))
    cap = n if share >= 1.0 else max(1, math.ceil(share * n))
    ids = [f"i{r}" for r in range(n_items)]
    got = choose(cand, votes, 1.0, seg, 0.1, np.zeros(0), 0.0, np.zeros(0), category=category, available=available,
                 consumed=np.array(sorted(had), np.int32), n=n, cap=cap, exclude={ids[r] for r in excl_rows},
                 item_ids=ids)
    mx = votes.max()
    score = [(votes[j] * (1.0 / mx) if mx > 0 else 0.0) + seg[cand[j]] * 0.1 for j in range(cand.size)]
    assert np.allclose(got.score, score)
    want, relaxed = _choose_reference(cand.tolist(), got.score.tolist(), category, available, had, excl_rows, n, cap)
    assert got.order[got.keep].tolist() == want
    assert got.relaxed == relaxed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2 ** 40), st.integers(0, 1000)), max_size=400))
def test_slot_table_behaves_like_a_dict(ops):
    table, ref = SlotTable(capacity=2), {}
    keys = [k for _, k, _ in ops]
    for j, (add, key, val) in enumerate(ops):
        key = keys[val % (j + 1)] if not add else key  # deletes mostly hit keys that were added
        if add:
            table.insert_many(np.array([key]), np.array([val]))
            ref[key] = val
        else:
            table.delete_many(np.array([key]))
            ref.pop(key, None)
        assert len(table) == len(ref)
    assert all(table.get(k) == v for k, v in ref.items())
    assert sorted(table.live_keys().tolist()) == sorted(ref)
    assert all(table.get(k) == -1 for k in set(keys) - set(ref))



def test_slot_table_pickled_as_separate_arrays_still_loads():
    """Snapshots from before the interleaved table held ``keys`` and ``vals`` arrays."""
    import pickle

    table = SlotTable(capacity=4)
    table.insert_many(np.array([5, 1 << 40, 77]), np.array([0, 7, 3]))
    old = SlotTable.__new__(SlotTable)
    old.__dict__.update(keys=table.table[:, 0].copy(), vals=table.table[:, 1].copy(), meta=table.meta.copy())
    back = pickle.loads(pickle.dumps(old))
    assert [back.get(k) for k in (5, 1 << 40, 77, 6)] == [0, 7, 3, -1]
    back.insert_many(np.array([9]), np.array([4]))  # and it goes on working
    assert len(back) == 4 and back.get(9) == 4

def test_votes_momentum_follows_its_inputs_through_the_memo():
    """The momentum factor is memoised per item; a changed count, popularity or decay is seen at once."""
    from infogap.models.votes import vote

    nb = np.array([[-1, -1, -1], [1, 2, 3], [0, 2, -1]], np.int32)
    sq = np.array([0, 0, 0, 1.0, 2.0, 3.0, 1.5, 0.5, 0])
    blocks = np.array([1, 2], np.int32)
    ipop, avail, none = np.ones(4), np.ones(4, bool), np.zeros(0, np.int32)
    mom, pop = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 2.0, 2.0])

    def want(decay_m, decay_p):
        raw = {1: 1.0, 2: 2.0 + 0.5 * 0.5, 3: 3.0, 0: 0.5 * 1.5}
        return {j: v * ((mom[j] * decay_m + 0.5) / (pop[j] * decay_p + 1.0)) ** 0.3 for j, v in raw.items()}

    for decay_m, decay_p, change in ((1.0, 1.0, None), (1.0, 1.0, None), (0.5, 1.0, None), (0.5, 1.0, 2),
                                     (0.5, 0.9, 3)):
        if change is not None:
            mom[change] += 1.0
            pop[change] *= 1.5
        v = vote(nb, sq * 0, sq, blocks, np.array([1.0, 0.5]), np.zeros(0), ipop=ipop, available=avail,
                 consumed=none, mom_count=mom, mom_decay=decay_m, pop=pop, pop_decay=decay_p, momentum=0.3)
        got = dict(zip(v.rows.tolist(), v.votes.tolist()))
        assert got.keys() == want(decay_m, decay_p).keys()
        for j, x in want(decay_m, decay_p).items():
            assert got[j] == pytest.approx(x, rel=1e-12), (decay_m, decay_p, change, j)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_votes_and_anchors_match_a_plain_loop_whether_marks_are_scanned_or_touches_noted(data):
    """Small catalogs next to k x M slots scan the marks; large ones note first touches: same answer."""
    from infogap.models.votes import vote

    m = data.draw(st.integers(2, 5))
    n_blocks = data.draw(st.integers(1, 6))
    n_items = data.draw(st.sampled_from([4, 9, 200]))  # 200 > 2 k M: the noting path
    nb = np.array(data.draw(st.lists(st.lists(st.integers(-1, min(n_items, 12) - 1), min_size=m, max_size=m),
                                     min_size=n_blocks, max_size=n_blocks)), np.int32)
    nb[0] = -1  # block 0: no neighbours
    nb = np.array([list(dict.fromkeys(r)) + [-1] * (m - len(dict.fromkeys(r))) for r in nb.tolist()], np.int32)
    sq_s = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=n_blocks * m,
                                       max_size=n_blocks * m)))
    sq_d = np.array(data.draw(st.lists(st.sampled_from([0.0, 1.0, 3.0]), min_size=n_blocks * m,
                                       max_size=n_blocks * m)))
    k = data.draw(st.integers(0, 5))
    blocks = np.array(data.draw(st.lists(st.integers(0, n_blocks - 1), min_size=k, max_size=k)), np.int32)
    a_sym = np.array(data.draw(st.lists(st.sampled_from([0.25, 1.0]), min_size=k, max_size=k)))
    kd = data.draw(st.integers(0, k))
    a_dir = a_sym[:kd] * 2
    consumed = np.array(sorted(data.draw(st.sets(st.integers(0, min(n_items, 12) - 1)))), np.int32)
    available = np.array([r % 5 != 4 for r in range(n_items)])
    ipop = 1.0 + np.arange(n_items) / 10
    n_anchor = data.draw(st.integers(0, 4))

    raw, best = {}, {}
    for h in range(k):
        for s in range(m):
            j = int(nb[blocks[h], s])
            if blocks[h] == 0 or j < 0:
                continue
            c = sq_s[blocks[h] * m + s] * a_sym[h] + (sq_d[blocks[h] * m + s] * a_dir[h] if h < kd else 0.0)
            raw[j] = raw.get(j, 0.0) + c
            if h < n_anchor and c > best.get(j, (-1.0, -1))[0]:
                best[j] = (c, h * m + s)
    want = {j: 0.0 if j in set(consumed.tolist()) or not available[j] else v * ipop[j] for j, v in raw.items()}

    v = vote(nb, sq_d, sq_s, blocks, a_sym, a_dir, ipop=ipop, available=available, consumed=consumed)
    got = dict(zip(v.rows.tolist(), v.votes.tolist()))
    # an item whose votes add up to 0 (zero weights) may be left out: it can never be picked for them
    assert {j for j, x in got.items() if x} == {j for j, x in raw.items() if x} - {j for j, x in want.items() if not x}
    assert set(got) <= set(want)
    for j, x in want.items():
        assert got.get(j, 0.0) == pytest.approx(x, rel=1e-12)
    picks = np.array(sorted(set(sorted(want)[::2]) | {n_items - 1}), np.int64)  # distinct; the last: maybe unvoted
    assert v.anchors(picks, n_anchor).tolist() == [best.get(j, (0, -1))[1] for j in picks.tolist()]
