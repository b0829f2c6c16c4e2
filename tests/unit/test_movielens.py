"""MovieLens-100K loader: parsing from a fabricated wheel (no network) and the real data's shape."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from infogap.stream.tools import downloads
from infogap.stream.tools import movielens
from infogap.stream.tools.movielens import MovieLensUnavailable, load_movielens, make_fake_wheel

INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         "7\t3\t5\t300\n2\t10\t1\t300\n2\t3\t4\t300\n1\t1\t3\t100\n")
ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tSe7en\t1995\tCrime Thriller\n1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "3\tFour Rooms\t1995\tThriller\n")
USER = ("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "2\t53\tF\tother\t94043\n1\t24\tM\ttechnician\t85711\n7\t30\tM\twriter\t12345\n")


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    """Make the download copy a fabricated wheel instead of calling pip; counts the calls."""
    wheel = make_fake_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl", INTER, ITEM, USER)
    calls = []

    def download(dest: Path) -> Path:
        calls.append(dest)
        return Path(shutil.copy(wheel, dest / wheel.name))

    monkeypatch.setattr(movielens, "_download_wheel", download)
    return calls


def test_parses_contract_records_from_the_wheel(tmp_path, fake_download):
    ml = load_movielens(tmp_path / "cache")
    assert [(e["ts"], e["user_id"], e["item_id"]) for e in ml.events] == [
        (100.0, "u1", "m1"), (300.0, "u2", "m3"), (300.0, "u2", "m10"), (300.0, "u7", "m3")]
    assert ml.events[1] == {"event_id": "ml-2-3-300", "user_id": "u2", "item_id": "m3", "type": "rate",
                            "ts": 300.0, "rating": 4.0}
    assert all(isinstance(e["ts"], float) and isinstance(e["rating"], float) for e in ml.events)
    assert ml.items[0] == {"item_id": "m1", "title": "Toy Story", "category": "Animation",
                           "tags": ["Animation", "Children's", "Comedy"], "price": None, "available": True}
    assert [i["category"] for i in ml.items] == ["Animation", "Thriller", "Crime"]
    assert ml.users[0] == {"user_id": "u1", "age": 24, "gender": "M", "occupation": "technician"}
    assert not any("zip" in k or v in ("85711", "94043") for u in ml.users for k, v in u.items())


def test_second_load_uses_the_cache(tmp_path, fake_download):
    a = load_movielens(tmp_path / "cache")
    b = load_movielens(tmp_path / "cache")
    assert len(fake_download) == 1 and a.events == b.events
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == list(movielens.FILES)


def test_cache_dir_from_environment(tmp_path, fake_download, monkeypatch):
    monkeypatch.setenv("INFOGAP_DATA_DIR", str(tmp_path / "envcache"))
    ml = load_movielens()
    assert ml.cache_dir == tmp_path / "envcache" and (tmp_path / "envcache" / "ml-100k.inter").is_file()


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    def fail(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for recbole==1.2.1")

    monkeypatch.setattr(downloads.subprocess, "run", fail)
    with pytest.raises(MovieLensUnavailable) as info:
        load_movielens(tmp_path / "cache")
    msg = str(info.value)
    assert "No matching distribution" in msg and "INFOGAP_DATA_DIR" in msg and "pip download" in msg


def test_wheel_without_the_data_is_refused(tmp_path):
    import zipfile
    bad = tmp_path / "recbole.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
    with pytest.raises(MovieLensUnavailable, match="does not contain"):
        movielens.extract_from_wheel(bad, tmp_path / "c")


def test_real_movielens_100k(tmp_path_factory):
    try:
        ml = load_movielens()
    except MovieLensUnavailable as exc:
        print(f"SKIP reason: {exc}")
        pytest.skip(f"MovieLens-100K cannot be downloaded here: {str(exc).splitlines()[0]}")
    assert len(ml.events) == 100_000
    assert len({e["user_id"] for e in ml.events}) == len(ml.users) == 943
    assert len({e["item_id"] for e in ml.events}) == len(ml.items) == 1682
    assert all(a["ts"] <= b["ts"] for a, b in zip(ml.events, ml.events[1:]))
    assert len({e["event_id"] for e in ml.events}) == 100_000
    assert {e["rating"] for e in ml.events} == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert all(i["category"] == i["tags"][0] for i in ml.items)
