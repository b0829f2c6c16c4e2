"""Stale compiled kernels are dropped when any models/ source changes (stream.kernel_cache)."""
from __future__ import annotations

import shutil

from models import warm_up
from stream.kernel_cache import MODELS_DIR, drop_stale_kernels, models_cache_dir


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
