"""Real small file systems for fault tests: a tmpfs mounted for the length of a test (root on
Linux only; the test is skipped elsewhere)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """`folder` (made here) with a tmpfs of `options` (e.g. 'size=2m', 'size=1m,ro') mounted on it."""
    mount = shutil.which("mount")
    if not sys.platform.startswith("linux") or mount is None:
        pytest.skip("needs Linux and mount(8) to make a small filesystem")
    folder.mkdir()
    done = subprocess.run([mount, "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
