"""Model load time right after another process freed several GB (issue 14, defect 8).

    .venv/bin/python bench/load_stall.py [MODEL] [--rounds 4] [--hog-gb 16] [--dtype float32]

Each round, for each way of giving checkpoint pages back (interleaved, so that drift on the
machine hits both alike):
1. a hog process allocates `--hog-gb` GiB, touches every page and exits (a previous run, or
   any multi-GB job, handing its memory back); its touch rate (GiB/s) shows how slowly this
   machine hands out memory just freed (on a VM whose host takes freed memory back, the
   first touch of it costs a fault on the host: 0.4 GiB/s against 4.5 GiB/s seen here);
2. a fresh process loads MODEL (default: the offline demo model) with `load_model`, and
   prints the load's wall time, its minor and major page faults and its peak RSS.

The ways: `periodic` drops checkpoint pages every 0.2 s during every load (apostate before
issue 14); `as-needed` drops them during a load only when it casts or quantizes, and once
after it (today). The summary gives min / median / max load time per way: the point is the
worst case, which should stay near the best.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAYS = ("periodic", "as-needed")

HOG = """
import sys, time, torch
start = time.perf_counter()
block = torch.ones(int(float(sys.argv[1]) * 2**30 / 4))  # every page written
print(float(sys.argv[1]) / (time.perf_counter() - start))  # GiB/s: low where the host hands memory back slowly
"""

LOAD = """
import json, resource, sys, time
from apostate.model import loading
from apostate.model.sources import resolve_source
from apostate.settings import parse_command_line

model, dtype, way = sys.argv[1:4]
if way == "periodic":  # apostate before issue 14: drop pages during every load
    loading._converts = lambda *args: True
settings = parse_command_line([model, "--dtypes", dtype])
source = resolve_source(settings.model, settings.model_revision, settings.cache_path())
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
loading.load_model(source, settings)
seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "minor_faults": after.ru_minflt - before.ru_minflt,
                  "major_faults": after.ru_majflt - before.ru_majflt, "peak_rss_gib": after.ru_maxrss / 2**20}))
"""


def run_python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"load_stall: a child process failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="demo")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--hog-gb", type=float, default=16.0)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    run_python(LOAD, args.model, args.dtype, "as-needed")  # converts a GGUF once, warms the page cache
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    print(f"{'round':>5} {'way':>10} {'hog GiB/s':>9} {'load s':>7} {'minor faults':>12} {'major':>6} {'peak RSS':>9}")
    for round_number in range(1, args.rounds + 1):
        for way in WAYS if round_number % 2 else reversed(WAYS):
            hog_rate = float(run_python(HOG, str(args.hog_gb)))
            result = json.loads(run_python(LOAD, args.model, args.dtype, way))
            times[way].append(result["seconds"])
            print(
                f"{round_number:>5} {way:>10} {hog_rate:>9.1f} {result['seconds']:>7.1f} {result['minor_faults']:>12,} "
                f"{result['major_faults']:>6,} {result['peak_rss_gib']:>7.2f} G",
                flush=True,
            )
    print("\nload time after a freed hog: min / median / max")
    for way, seconds in times.items():
        print(f"{way:>10}: {min(seconds):.1f} / {statistics.median(seconds):.1f} / {max(seconds):.1f} s")


if __name__ == "__main__":
    main()
