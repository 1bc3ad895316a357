"""Peak RSS and wall time of full headless runs at float32, bfloat16 and 4-bit, and of the merged export.

    .venv/bin/python bench/memory.py [MODEL] [--modes float32 bfloat16 4bit 4bit-bf16] [--workdir DIR] [-- extra apostate args]

MODEL defaults to the offline demo model. Each mode is one headless run (a few trials, then
`--actions save`), polled with psutil every 50 ms; the per-phase peaks come from the run's
own phases.json. The export peak is compared with the size of the full-precision checkpoint
(the safetensors bytes of the base), which is what issue 4 bounds (at most 1.5x).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "float32": ["--dtypes", "float32"],
    "bfloat16": ["--dtypes", "bfloat16"],
    "4bit": ["--dtypes", "float32", "--quantization", "bnb_4bit"],  # compute in float32
    "4bit-bf16": ["--dtypes", "bfloat16", "--quantization", "bnb_4bit"],  # the usual QLoRA setting
}
SMALL_RUN = [
    "--n-trials", "3", "--n-startup-trials", "3", "--seed", "0", "--max-response-tokens", "32", "--batch-size", "16",
    "--harmless.direction-count", "100", "--harmful.direction-count", "100",
    "--harmless.evaluation-count", "25", "--harmful.evaluation-count", "25",
    "--harmless.heldout-count", "0", "--harmful.heldout-count", "0",
    "--headless", "--trial", "2", "--actions", "save",
]  # fmt: skip


def run_polled(cmd: list[str], log: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS of the process tree, exit code)."""
    peak = 0
    done = threading.Event()
    start = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        watched = psutil.Process(process.pid)

        def poll() -> None:
            nonlocal peak
            while not done.wait(0.05):
                try:
                    tree = [watched, *watched.children(recursive=True)]
                    peak = max(peak, sum(p.memory_info().rss for p in tree))
                except psutil.Error:
                    pass  # a process ended between listing and reading

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        code = process.wait()
        done.set()
        thread.join()
    return time.monotonic() - start, peak, code


def checkpoint_bytes(model: str) -> int:
    """Bytes of the base's safetensors files (the demo resolves to its converted folder)."""
    from apostate.model.sources import resolve_source
    from apostate.settings import Settings

    source = resolve_source(model, None, Settings(model=model).cache_path())
    return sum(path.stat().st_size for path in Path(source.location).glob("*.safetensors"))


def main(argv: list[str]) -> None:
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="demo")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="apostate-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    full_size = checkpoint_bytes(args.model)
    gib = 1024**3
    print(f"full-precision checkpoint: {full_size / gib:.2f} GiB; work folder {workdir}")
    rows = []
    for mode in args.modes:
        run_dir = workdir / mode
        cmd = [str(REPO / ".venv/bin/apostate"), args.model, "--run-dir", str(run_dir), *MODES[mode], *SMALL_RUN,
               "--output-dir", str(run_dir / "model"), *extra]  # fmt: skip
        wall, peak, code = run_polled(cmd, workdir / f"{mode}.log")
        phases = (
            {p["name"]: p for p in json.loads((run_dir / "phases.json").read_text())["phases"]} if code == 0 else {}
        )
        save = phases.get("chosen trial: save", {})
        rows.append((mode, code, wall, peak, phases, save))
        print(f"{mode}: exit {code}, {wall:.0f} s, peak {peak / gib:.2f} GiB", flush=True)

    print(f"\n{'mode':<9} {'exit':>4} {'wall s':>7} {'peak GiB':>9} {'trials s':>9} {'trials peak':>11} "
          f"{'save s':>7} {'save peak':>9} {'save/model':>10}")  # fmt: skip
    for mode, code, wall, peak, phases, save in rows:
        trials = phases.get("trials", {})
        ratio = save.get("peak_rss", 0) / full_size if save else float("nan")
        print(f"{mode:<9} {code:>4} {wall:>7.0f} {peak / gib:>9.2f} {trials.get('seconds', 0):>9.0f} "
              f"{trials.get('peak_rss', 0) / gib:>11.2f} {save.get('seconds', 0):>7.0f} "
              f"{save.get('peak_rss', 0) / gib:>9.2f} {ratio:>10.2f}")  # fmt: skip
    print("\nPer-phase peaks (GiB):")
    for mode, _, _, _, phases, _ in rows:
        print(f"  {mode}: " + ", ".join(f"{name} {p['peak_rss'] / gib:.2f}" for name, p in phases.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
