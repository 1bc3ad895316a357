"""What a worker costs: the same study run by 1 and by N workers sharing it through PostgreSQL.

    .venv/bin/python bench/workers.py [--workers 1 2] [--trials 12] [-- apostate settings...]

Starts a throwaway PostgreSQL server on 127.0.0.1 (tests/postgres_server.py: the Debian
`postgresql` package must be installed), then for each count of workers (1 and 2 by default), each in a fresh
database: starts the workers at the same moment on the demo model (examples/demo-quick.toml,
--n-startup-trials 6, headless, no actions; any settings after `--` replace these), waits for them, and prints:

- wall time, and trials per hour over the trial phase (first trial start to last trial end);
- the duplicate-parameter rate: the share of finished trials whose parameters all lie within
  1% of their range of an earlier finished trial's (0 for independent draws);
Each worker gets an equal share of the cores (OMP_NUM_THREADS).

- per worker: its trials, load and start-up seconds (its phases.json), and whether it measured
  the start-up or fetched it from the study.

On one machine the workers share its cores and memory: expect no speed-up on a 2-core CPU; the
numbers show what each extra worker costs. With one GPU per worker, trials scale with workers
after each one's start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from postgres_server import PostgresServer  # noqa: E402

DEFAULT = [
    "demo", "--config", str(ROOT / "examples/demo-quick.toml"), "--n-startup-trials", "6", "--headless", "--actions", "[]",
]  # fmt: skip
STUDY = "bench"


def run_workers(server: PostgresServer, count: int, trials: int, settings: list[str], folder: Path) -> dict:
    url = server.create_database()
    workers, logs = [], []
    # Each worker gets its share of the cores: torch's default (all of them, in every process)
    # oversubscribes them, and a 23 s demo trial then took 152 s beside a second worker.
    threads = str(max(1, (os.cpu_count() or 1) // count))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    started = time.perf_counter()
    for index in range(count):
        run_dir = folder / f"{count}-workers-{index}"
        log = (folder / f"{count}-workers-{index}.log").open("w")
        flags = ["--run-dir", str(run_dir), "--storage", url, "--study-name", STUDY, "--n-trials", str(trials)]
        command = [sys.executable, "-m", "apostate", *settings, *flags]
        workers.append((run_dir, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)))
        logs.append(log)
    for (_, process), log in zip(workers, logs, strict=True):
        process.wait()
        log.close()
    wall = time.perf_counter() - started
    codes = [process.returncode for _, process in workers]
    if any(codes):
        for run_dir, _ in workers:
            print(
                f"--- {run_dir.name}.log, last lines:\n"
                + "".join(run_dir.with_suffix(".log").read_text().splitlines(True)[-15:])
            )
        raise SystemExit(f"a worker failed: exit codes {codes}")
    study = optuna.load_study(study_name=STUDY, storage=url)
    run_dirs = [run_dir for run_dir, _ in workers]
    return {"wall": wall, "codes": codes, "study": study, "run_dirs": run_dirs, "threads": threads}


def duplicate_rate(finished: list[optuna.trial.FrozenTrial], tolerance: float = 0.01) -> float:
    def close(a, b) -> bool:
        if a.params.keys() != b.params.keys():
            return False
        for name, value in a.params.items():
            distribution = a.distributions[name]
            width = getattr(distribution, "high", 1) - getattr(distribution, "low", 0) or 1
            if isinstance(value, (int, float)) and abs(value - b.params[name]) > tolerance * width:
                return False
            if not isinstance(value, (int, float)) and value != b.params[name]:
                return False
        return True

    ordered = sorted(finished, key=lambda t: t.datetime_start)
    duplicates = sum(any(close(t, earlier) for earlier in ordered[:i]) for i, t in enumerate(ordered))
    return duplicates / max(1, len(ordered))


def report(count: int, result: dict) -> None:
    study = result["study"]
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = study.get_trials(deepcopy=False, states=states)
    start = min(t.datetime_start for t in finished)
    end = max(t.datetime_complete for t in finished)
    trial_hours = (end - start).total_seconds() / 3600
    seconds = sorted(t.user_attrs["seconds"]["total"] for t in finished if "seconds" in t.user_attrs)
    median = seconds[len(seconds) // 2] if seconds else float("nan")
    print(
        f"\n{count} worker(s), {result['threads']} threads each: exit codes {result['codes']}, wall {result['wall']:.0f} s"
    )
    print(f"  finished trials {len(finished)}, all trials {len(study.trials)}")
    print(f"  trials per hour over the trial phase: {len(finished) / trial_hours:.0f} (median trial {median:.1f} s)")
    print(f"  duplicate-parameter rate (all parameters within 1% of range): {duplicate_rate(finished):.2f}")
    by_worker = {}
    for trial in finished:
        by_worker.setdefault(trial.user_attrs.get("worker"), []).append(trial.number)
    measured_by = study.user_attrs.get("startup", {}).get("worker")
    for run_dir in result["run_dirs"]:
        phases = json.loads((run_dir / "phases.json").read_text()) if (run_dir / "phases.json").is_file() else {}
        spent = {p["name"]: p["seconds"] for p in phases.get("phases", [])}
        log = run_dir.with_suffix(".log").read_text() if run_dir.with_suffix(".log").is_file() else ""
        role = "measured the start-up" if "This worker measures" in log else "fetched the start-up"
        before = {name: value for name, value in spent.items() if name != "trials" and "chosen" not in name}
        phase_text = ", ".join(f"{name} {value:.0f} s" for name, value in before.items())
        setup = sum(before.values())
        print(f"  worker {run_dir.name}: {role}; before the trials {setup:.0f} s ({phase_text})")
    print(f"  trials per worker: { {k: len(v) for k, v in by_worker.items()} } (start-up measured by {measured_by})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run, in order")
    parser.add_argument("--trials", type=int, default=12)
    args, rest = parser.parse_known_args()
    settings = rest[1:] if rest[:1] == ["--"] else (rest or DEFAULT)
    with PostgresServer() as server, tempfile.TemporaryDirectory(prefix="apostate-bench-") as scratch:
        for count in args.workers:
            result = run_workers(server, count, args.trials, settings, Path(scratch))
            report(count, result)


if __name__ == "__main__":
    main()
