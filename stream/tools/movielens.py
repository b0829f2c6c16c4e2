"""MovieLens-100K, the public benchmark of infogap, as shipped inside the ``recbole`` wheel.

The wheel (``recbole==1.2.1``, pure Python) carries the dataset as RecBole "atomic files" under
``recbole/dataset_example/ml-100k/``: tab-separated text with typed headers such as
``user_id:token``. :func:`load_movielens` downloads the wheel once with pip (no install, no
dependencies), copies the three files it needs out of the zip into a cache directory and turns
them into contract records:

- ``events``: one ``rate`` event per rating, sorted by ``(ts, user, item)``;
- ``items``: contract items (``category`` is the first genre, ``tags`` all genres);
- ``users``: ``user_id``, ``age``, ``gender``, ``occupation`` (the zip code is never read out).

The cache directory is the ``cache_dir`` argument, else the environment variable
``INFOGAP_DATA_DIR``, else ``~/.cache/infogap/ml-100k``.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     ml = load_movielens(_doctest_cache(tmp))  # a tiny fabricated wheel, no network
>>> ml.events[0]
{'event_id': 'ml-1-2-100', 'user_id': 'u1', 'item_id': 'm2', 'type': 'rate', 'ts': 100.0, 'rating': 4.0}
>>> ml.items[0]["category"], ml.items[0]["tags"]
('Animation', ['Animation', "Children's", 'Comedy'])
>>> sorted(ml.users[0])
['age', 'gender', 'occupation', 'user_id']
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from infogap.stream.tools.downloads import DownloadFailed, pip_download

#: The wheel that carries the data, and where inside it the files are.
RECBOLE_REQUIREMENT = "recbole==1.2.1"
WHEEL_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
ENV_DATA_DIR = "INFOGAP_DATA_DIR"


class MovieLensUnavailable(RuntimeError):
    """The dataset could be neither found in the cache nor downloaded; the message says why and what to do."""


@dataclass(frozen=True)
class MovieLens:
    """MovieLens-100K as contract records (see the module docstring)."""

    events: list[dict]
    items: list[dict]
    users: list[dict]
    cache_dir: Path


def default_cache_dir() -> Path:
    """``$INFOGAP_DATA_DIR`` if set, else ``~/.cache/infogap/ml-100k``."""
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "infogap" / "ml-100k"


def load_movielens(cache_dir: Path | str | None = None) -> MovieLens:
    """Load MovieLens-100K, downloading the ``recbole`` wheel into ``cache_dir`` the first time.

    Raises :class:`MovieLensUnavailable` when the files are not cached and pip cannot fetch the wheel.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not all((cache / f).is_file() for f in FILES):
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="infogap-ml100k-") as tmp:
            wheel = _download_wheel(Path(tmp))
            extract_from_wheel(wheel, cache)
    return MovieLens(
        events=_read_events(cache / "ml-100k.inter"),
        items=_read_items(cache / "ml-100k.item"),
        users=_read_users(cache / "ml-100k.user"),
        cache_dir=cache,
    )


def extract_from_wheel(wheel: Path, cache_dir: Path) -> None:
    """Copy the three atomic files out of a recbole wheel into ``cache_dir`` (each written atomically)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            missing = [f for f in FILES if WHEEL_MEMBER_DIR + f not in names]
            if missing:
                raise MovieLensUnavailable(
                    f"{wheel} does not contain {', '.join(WHEEL_MEMBER_DIR + m for m in missing)}; "
                    f"expected the wheel of {RECBOLE_REQUIREMENT}")
            cache_dir.mkdir(parents=True, exist_ok=True)
            for f in FILES:
                tmp = cache_dir / (f + ".part")
                with zf.open(WHEEL_MEMBER_DIR + f) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, cache_dir / f)
    except zipfile.BadZipFile as exc:
        raise MovieLensUnavailable(f"{wheel} is not a valid wheel (zip) file: {exc}") from exc


def _download_wheel(dest: Path) -> Path:
    """``pip download recbole==1.2.1 --no-deps --only-binary=:all:`` into ``dest``; the wheel's path."""
    try:
        return pip_download(RECBOLE_REQUIREMENT, dest, "recbole-*.whl", binary=True, timeout=300)
    except DownloadFailed as exc:
        raise MovieLensUnavailable(_help(str(exc))) from exc


def _help(what: str) -> str:
    return (f"MovieLens-100K is not cached and the download failed: {what}\n"
            f"Fix the network or pip's index (PIP_INDEX_URL), or fetch the wheel elsewhere with "
            f"`pip download {RECBOLE_REQUIREMENT} --no-deps --only-binary=:all:` and extract "
            f"{WHEEL_MEMBER_DIR}{{{','.join(FILES)}}} into the cache directory "
            f"(argument cache_dir, env {ENV_DATA_DIR}, default ~/.cache/infogap/ml-100k).")


def _read_atomic(path: Path) -> tuple[dict[str, int], list[list[str]]]:
    """A RecBole atomic file: column name (type suffix dropped) -> index, and the rows as fields."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().splitlines()
    if not lines:
        raise MovieLensUnavailable(f"{path} is empty; delete the cache directory {path.parent} and retry")
    header = {name.split(":", 1)[0]: i for i, name in enumerate(lines[0].split("\t"))}
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return header, rows


def _columns(path: Path, header: dict[str, int], *names: str) -> list[int]:
    missing = [n for n in names if n not in header]
    if missing:
        raise MovieLensUnavailable(f"{path} lacks column(s) {missing}; delete {path.parent} and retry")
    return [header[n] for n in names]


def _read_events(path: Path) -> list[dict]:
    header, rows = _read_atomic(path)
    cu, ci, cr, ct = _columns(path, header, "user_id", "item_id", "rating", "timestamp")
    keyed = sorted((float(r[ct]), int(r[cu]), int(r[ci]), float(r[cr])) for r in rows)
    return [{"event_id": f"ml-{u}-{i}-{int(ts)}", "user_id": f"u{u}", "item_id": f"m{i}", "type": "rate",
             "ts": ts, "rating": rating} for ts, u, i, rating in keyed]


def _read_items(path: Path) -> list[dict]:
    header, rows = _read_atomic(path)
    ci, ct, cg = _columns(path, header, "item_id", "movie_title", "class")
    items = []
    for r in sorted(rows, key=lambda r: int(r[ci])):
        genres = r[cg].split() if len(r) > cg else []
        items.append({"item_id": f"m{int(r[ci])}", "title": r[ct].strip(),
                      "category": genres[0] if genres else None, "tags": genres,
                      "price": None, "available": True})
    return items


def _read_users(path: Path) -> list[dict]:
    header, rows = _read_atomic(path)
    cu, ca, cg, co = _columns(path, header, "user_id", "age", "gender", "occupation")
    return [{"user_id": f"u{int(r[cu])}", "age": int(r[ca]), "gender": r[cg], "occupation": r[co]}
            for r in sorted(rows, key=lambda r: int(r[cu]))]


def make_fake_wheel(path: Path, inter: str, item: str, user: str) -> Path:
    """Write a zip laid out like the recbole wheel with the given file texts (for tests and doctests)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in zip(FILES, (inter, item, user)):
            zf.writestr(WHEEL_MEMBER_DIR + name, text)
    return path


def _doctest_cache(tmp: str) -> Path:  # pragma: no cover - doctest helper
    d = Path(tmp)
    wheel = make_fake_wheel(
        d / "recbole-0-py3-none-any.whl",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n2\t1\t5\t200\n1\t2\t4\t100\n",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n2\tGoldenEye\t1995\tAction\n",
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n")
    extract_from_wheel(wheel, d / "ml-100k")
    return d / "ml-100k"
