"""Drop numba's on-disk kernels of ``models/`` when any of its sources changed.

numba checks a cached kernel against its own source file only. A kernel that calls kernels of
another file (``rank_core._core`` calls ``votes._votes`` and ``selection._why``;
``learn_core._learn_event`` calls ``cooccurrence._learn_one``) is loaded from the cache after that
other file changed, and computes with the old code, silently. That happens in a checkout that is
edited or pulled, which is what the editable install of ``deploy/install.sh`` runs from. So the
entry points (the CLI, the tests) call :func:`drop_stale_kernels` first: it keeps a digest of all
of ``models/*.py`` beside the cache and empties the cache when the digest changes. The first run
after a change then compiles for longer (``warm_up`` says how long), once.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "m.py").write_text("x = 1"), (d / "k.nbi").write_text("")
>>> drop_stale_kernels(d, d), drop_stale_kernels(d, d), (d / "k.nbi").exists()
(True, False, False)
"""
from __future__ import annotations

import hashlib
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
_STAMP = "infogap-models.sha256"


def models_cache_dir() -> Path | None:
    """Where numba keeps the kernels of ``models/`` (None when it has nowhere to keep them, or its
    internals changed)."""
    from infogap.models import votes

    func = votes._top.py_func
    try:
        from numba.core import caching

        impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # public from numba 0.62
        for locator in impl._locator_classes:  # numba's own order of choice
            found = locator.from_function(func, func.__code__.co_filename)
            if found is not None:
                return Path(found.get_cache_path())
    except (ImportError, AttributeError, OSError):
        pass
    return None


def drop_stale_kernels(source_dir: Path = MODELS_DIR, cache_dir: Path | None = None) -> bool:
    """Remove the cached kernels in ``cache_dir`` (default: numba's for ``models/``) unless they were
    compiled from the current ``source_dir/*.py``; returns whether any were dropped."""
    cache_dir = models_cache_dir() if cache_dir is None else cache_dir
    if cache_dir is None:
        return False
    digest = hashlib.sha256()
    for path in sorted(source_dir.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    stamp = cache_dir / _STAMP
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        return False
    stale = [p for p in cache_dir.iterdir() if p.suffix in (".nbi", ".nbc")] if cache_dir.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)  # another process may have dropped it first
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:  # a read-only cache: numba falls back to compiling, nothing stale is loaded from here
        pass
    return bool(stale)
