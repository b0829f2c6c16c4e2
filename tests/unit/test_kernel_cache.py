"""Stale compiled kernels are dropped when any models/ source changes (infogap.stream.tools.kernel_cache)."""
from __future__ import annotations

import shutil

from infogap.models import warm_up
from infogap.stream.tools.kernel_cache import MODELS_DIR, drop_stale_kernels, models_cache_dir


def test_the_cache_dir_found_is_where_numba_keeps_the_models_kernels():
    warm_up()
    where = models_cache_dir()
    assert where is not None and any(p.name.startswith("rank_core._core") for p in where.glob("*.nbi"))


def test_a_change_in_any_models_file_drops_every_cached_kernel(tmp_path):
    src, cache = tmp_path / "models", tmp_path / "cache"
    shutil.copytree(MODELS_DIR, src, ignore=shutil.ignore_patterns("__pycache__"))
    cache.mkdir()
    kernels = [cache / "rank_core._core-35.py311.nbi", cache / "rank_core._core-35.py311.1.nbc"]
    for k in kernels:
        k.write_bytes(b"compiled")
    assert drop_stale_kernels(src, cache)  # no digest yet: nothing says what these were compiled from
    for k in kernels:
        k.write_bytes(b"compiled")  # compiled again, from these sources
    assert not drop_stale_kernels(src, cache) and all(k.exists() for k in kernels)
    (src / "selection.py").write_text((src / "selection.py").read_text() + "\n# a callee of rank_core changed\n")
    assert drop_stale_kernels(src, cache) and not any(k.exists() for k in kernels)


#: What the stream's stages do with the models, in a fresh process after ``warm_up()``; prints the
#: kernels that compiled for new argument types meanwhile (none should: a worker warms up before its
#: first batch, and a kernel compiled mid-stream stalls a batch for seconds).
_STREAM_PATHS = """
import numpy as np
from numba.core.registry import CPUDispatcher
import infogap.models, infogap.models.cooccurrence, infogap.models.learn_core, infogap.models.rank_core, infogap.models.selection, infogap.models.slot_table
import infogap.models.profile, infogap.models.trending
import infogap.models.votes
from infogap.models import Engine, EngineConfig, warm_up
from infogap.models.cooc_shard import CoOccurrenceShard, PairDeltas

def signatures():
    return {(m.__name__, k): tuple(f.signatures) for m in (infogap.models.cooccurrence, infogap.models.learn_core, infogap.models.rank_core,
            infogap.models.selection, infogap.models.slot_table, infogap.models.votes, infogap.models.profile,
            infogap.models.trending)
            for k, f in vars(m).items() if isinstance(f, CPUDispatcher)}

warm_up()
before = signatures()
events = [{"event_id": f"e{k}", "user_id": f"u{k % 7}", "type": ("view", "purchase")[k % 5 == 0], "ts": 10.0 + k,
           "item_id": f"i{(k * 7) % 40}", "value": 3.0} for k in range(600)]
items = [{"item_id": f"i{j}", "title": f"Item {j}", "category": f"c{j % 3}"} for j in range(45)]
local = Engine(EngineConfig(n_neighbours=8))
for it in items:
    local.upsert_item(it)
local.learn_many(events[:500])
for e in events[500:]:
    local.learn_one(e)
local.recommend("u1", 5, exclude={"i7"}), local.recommend_ids("u2", 5), local.recommend("nobody", 3)
local.similar("i7", 5)
users = Engine(EngineConfig(n_neighbours=8), cooc="remote", population="remote")  # a user stage
for it in items:
    users.upsert_item(it)
users.learn_many(events)
shard = CoOccurrenceShard.for_engine(users.config)  # an item stage
shard.apply(PairDeltas.from_bytes(users.drain_pair_deltas().to_bytes()), source=0)
shard.similar("i7", 5)
users.load_rows([shard.export_row(i) for i in shard.owned()])
users.recommend("u1", 5), users.recommend("u3", 5, explain=False)
users.drop_rows(["i7"])
from infogap.models.slot_table import SlotTable
index = SlotTable(capacity=1)  # grown (rehashed) as a learner's index grows
index.insert_many(np.arange(100), np.arange(100))
index.delete_many(np.arange(5))
after = signatures()
print(sorted(f"{m}.{k}" for (m, k), s in after.items() if s != before.get((m, k), ())))
"""


def test_after_warm_up_the_stream_paths_compile_nothing():
    """The first ``infogap bench`` on a fresh machine had a freshness p99 of 1.5 s: the item stage's
    row export and the user stage's row loading compiled their kernels in the middle of the stream."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _STREAM_PATHS], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
