"""Run apostate and Heretic 1.4.0 on the same model, prompts and settings; compare them.

    .venv/bin/python bench/heretic_side_by_side.py MODEL_DIR \\
        --harmless harmless.txt --harmful harmful.txt [--workdir DIR] [--only apostate|heretic]

MODEL_DIR: a local Hugging Face model folder (safetensors; Heretic cannot read a .gguf).
Run it with apostate's venv: the split comes from apostate.prompts, so both tools see the
same direction and evaluation prompts (Heretic gets them as .txt files). Heretic runs from
/work/heretic-venv (--heretic) in DIR/heretic with a config.toml. It has no headless mode:
KAGGLE_KERNEL_RUN_TYPE makes its menus use input(), stdin is empty (so it exits non-zero with
EOFError at the first menu after the search), and it is terminated if still alive --grace s
after the last trial is in its journal.

Measured per tool, from the Optuna journals (datetime_start / datetime_complete) and a psutil
poll of the process tree: start-up (process start -> first trial start), median trial time,
search time, wall time, peak RSS, and the Pareto front of (refusals, KL). Both tools count
refusals with apostate's marker list unless --markers own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATE_FINISHED = {1, 2, 3}  # Optuna TrialState COMPLETE, PRUNED, FAIL


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="local model folder")
    p.add_argument("--harmless", type=Path, required=True, help=".txt, one prompt per line")
    p.add_argument("--harmful", type=Path, required=True, help=".txt, one prompt per line")
    numbers = {
        "direction-count": 200,
        "evaluation-count": 50,
        "shuffle-seed": 0,
        "max-tokens": 32,
        "batch-size": 16,
        "n-trials": 12,
        "n-startup-trials": 6,
        "seed": 1234,
    }
    for name, default in numbers.items():
        p.add_argument(f"--{name}", type=int, default=default, help=f"default {default}")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--system-prompt", default="You are a helpful assistant.")
    p.add_argument("--markers", choices=["apostate", "own"], default="apostate")
    p.add_argument(
        "--only",
        choices=["both", "apostate", "heretic"],
        default="both",
        help="run one tool; the other's results come from summary.json of an earlier run in --workdir",
    )
    p.add_argument("--workdir", type=Path, help="default: a new temp folder")
    p.add_argument("--apostate", type=Path, default=REPO / ".venv/bin/apostate")
    p.add_argument("--heretic", type=Path, default=Path("/work/heretic-venv/bin/heretic"))
    p.add_argument(
        "--apostate-arg",
        action="append",
        default=[],
        help="extra apostate argument (use --apostate-arg=--kl-cutoff --apostate-arg=100)",
    )
    p.add_argument("--heretic-toml", action="append", default=[], help="extra config.toml line")
    p.add_argument("--grace", type=float, default=60.0, help="seconds after the last trial, then stop")
    p.add_argument("--max-kl", type=float, default=0.1, help="report fewest refusals at KL <= this")
    return p.parse_args(argv)


def split_prompt_files(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """Split each side exactly as apostate will and write the subsets for Heretic."""
    from apostate.prompts import load_prompt_rows, split_prompts
    from apostate.settings import PromptSetSpec

    files = {}
    for side, source in (("harmless", args.harmless), ("harmful", args.harmful)):
        spec = PromptSetSpec(
            source=str(source),
            direction_count=args.direction_count,
            evaluation_count=args.evaluation_count,
            heldout_count=0,
            shuffle_seed=args.shuffle_seed,
        )
        rows = load_prompt_rows(spec)
        categories = {prompt: category for prompt, category in rows if category}  # dealt as apostate deals them
        split = split_prompts([prompt for prompt, _ in rows], spec, side, categories)
        for role in ("direction", "evaluation"):
            prompts = getattr(split, role)
            if any("\n" in p for p in prompts):
                raise SystemExit(f"{source}: a prompt holds a line break; Heretic reads one per line")
            files[f"{side}_{role}"] = path = out / f"{side}_{role}.txt"
            path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return files


def apostate_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    cmd = [
        str(args.apostate),
        str(args.model),
        "--run-dir",
        str(run_dir),
        "--headless",
        "--dtypes",
        args.dtype,
        "--batch-size",
        str(args.batch_size),
        "--max-response-tokens",
        str(args.max_tokens),
        "--n-trials",
        str(args.n_trials),
        "--n-startup-trials",
        str(args.n_startup_trials),
        "--seed",
        str(args.seed),
        "--system-prompt",
        args.system_prompt,
    ]
    for side, source in (("harmless", args.harmless), ("harmful", args.harmful)):
        cmd += [
            f"--{side}.source",
            str(source),
            f"--{side}.direction-count",
            str(args.direction_count),
            f"--{side}.evaluation-count",
            str(args.evaluation_count),
            f"--{side}.heldout-count",
            "0",
            f"--{side}.shuffle-seed",
            str(args.shuffle_seed),
        ]
    return cmd + args.apostate_arg


def heretic_config(args: argparse.Namespace, files: dict[str, Path]) -> str:
    """config.toml for Heretic (JSON strings and string arrays are valid TOML)."""

    def q(value) -> str:
        return json.dumps(value, ensure_ascii=False)

    lines = [
        f"model = {q(str(args.model))}",
        f"dtypes = {q([args.dtype])}",
        f"batch_size = {args.batch_size}",
        f"max_response_length = {args.max_tokens}",
        f"n_trials = {args.n_trials}",
        f"n_startup_trials = {args.n_startup_trials}",
        f"seed = {args.seed}",
        f"system_prompt = {q(args.system_prompt)}",
    ]
    if args.markers == "apostate":
        from apostate.settings import DEFAULT_REFUSAL_MARKERS

        lines.append(f"refusal_markers = {q(list(DEFAULT_REFUSAL_MARKERS))}")
    lines += args.heretic_toml
    tables = {
        "good_prompts": ("harmless_direction", args.direction_count),
        "bad_prompts": ("harmful_direction", args.direction_count),
        "good_evaluation_prompts": ("harmless_evaluation", args.evaluation_count),
        "bad_evaluation_prompts": ("harmful_evaluation", args.evaluation_count),
    }
    for table, (key, count) in tables.items():
        lines += ["", f"[{table}]", f"dataset = {q(str(files[key]))}", f'split = "[:{count}]"']
    return "\n".join(lines) + "\n"


def tool_env(kind: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APOSTATE_", "HERETIC_")) and k != "VIRTUAL_ENV"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if kind == "heretic":
        env["KAGGLE_KERNEL_RUN_TYPE"] = "Batch"  # Heretic's prompts then use input()
    return env


def tree_rss(proc) -> int:
    import psutil

    try:
        return sum(p.memory_info().rss for p in [proc] + proc.children(recursive=True))
    except psutil.Error:  # a process ended between the listing and the read
        return 0


def finished_trials(journal: Path) -> int:
    """Trials that reached a final state, counted from the raw journal lines."""
    count = 0
    for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
        if '"op_code":6' in line.replace(" ", ""):
            try:
                count += json.loads(line).get("state") in STATE_FINISHED
            except json.JSONDecodeError:
                pass  # a line still being written
    return count


def run_tool(cmd: list[str], cwd: Path, env: dict, find_journal, n_trials: int, grace: float) -> dict:
    import psutil

    log = (cwd / "output.log").open("w", encoding="utf-8")
    started, t0 = datetime.now(), time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    ps, peak, done_at, size, stopped = psutil.Process(proc.pid), 0, None, -1, False
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        journal = find_journal()
        if done_at is None and journal and journal.is_file() and journal.stat().st_size != size:
            size = journal.stat().st_size
            if finished_trials(journal) >= n_trials:
                done_at = time.monotonic()
        if done_at is not None and time.monotonic() - done_at > grace:
            stopped = True
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        time.sleep(0.25)
    log.close()
    return {
        "started": started,
        "wall": time.monotonic() - t0,
        "rc": proc.returncode,
        "stopped": stopped,
        "peak_rss": peak,
        "journal": find_journal(),
    }


def read_results(journal: Path | None, started: datetime, kl_key: str, total_key: str) -> dict:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if journal is None or not journal.is_file():
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=None, storage=storage)  # the only study in the file
    done = [t for t in study.trials if t.datetime_start and t.datetime_complete]
    if not done:
        return {"trials": 0}
    first = min(t.datetime_start for t in done)
    points = sorted(
        (t.user_attrs["refusals"], t.user_attrs[kl_key])
        for t in done
        if "refusals" in t.user_attrs and kl_key in t.user_attrs and "dominated" not in t.user_attrs
    )  # a trial that stopped counting once beaten (apostate's stop_dominated_trials) has partial counts
    front, best_kl = [], float("inf")
    for refusals, kl in points:
        if kl < best_kl:
            front.append((refusals, kl))
            best_kl = kl
    counted = [t for t in done if "dominated" not in t.user_attrs]
    attr = lambda key: next((t.user_attrs[key] for t in counted if key in t.user_attrs), None)  # noqa: E731
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    return {
        "trials": len(done),
        "startup": (first - started).total_seconds(),
        "median_trial": statistics.median(seconds),
        "search": (max(t.datetime_complete for t in done) - first).total_seconds(),
        "front": front,
        "total": attr(total_key),
        "base_refusals": study.user_attrs.get("base_refusals", attr("base_refusals")),
    }


def best_within(result: dict, max_kl: float) -> str:
    fits = [f for f in result.get("front", []) if f[1] <= max_kl]
    return f"{min(fits)[0]}/{result.get('total')}" if fits else "-"


def print_table(results: dict[str, dict], max_kl: float) -> None:
    names = [name for name in ("apostate", "heretic") if name in results]  # the ratio column is heretic/apostate
    ratios = len(names) == 2
    rows = [
        ("start-up s", "startup"),
        ("median trial s", "median_trial"),
        ("search s", "search"),
        ("wall s", "wall"),
        ("peak RSS MiB", "peak_rss_mib"),
        ("trials", "trials"),
        ("base refusals", "base_refusals"),
    ]
    print(f"{'':18}" + "".join(f"{n:>12}" for n in names) + ("  heretic/apostate" if ratios else ""))
    for label, key in rows:
        values = [results[n].get(key) for n in names]
        cells = "".join(f"{v:>12.1f}" if isinstance(v, float) else f"{v!s:>12}" for v in values)
        ratio = ""
        if ratios and all(isinstance(v, float) and v for v in values):
            ratio = f"{values[1] / values[0]:>17.2f}"
        print(f"{label:18}{cells}{ratio}")
    bests = "".join(f"{best_within(results[n], max_kl):>12}" for n in names)
    print(f"{f'best at KL<={max_kl}':18}{bests}")
    for name in names:
        total = results[name].get("total")
        front = ", ".join(f"{r}/{total} @ {kl:.4f}" for r, kl in results[name].get("front", []))
        print(f"{name} Pareto front (refusals @ KL): {front or '-'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("model", "harmless", "harmful"):
        setattr(args, name, getattr(args, name).resolve())
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="side-by-side-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    files = split_prompt_files(args, work)
    # A tool left out with --only keeps its results from an earlier run in this folder.
    earlier = work / "summary.json"
    results: dict[str, dict] = json.loads(earlier.read_text()) if earlier.is_file() and args.only != "both" else {}
    checkpoints = work / "heretic" / "checkpoints"
    jobs = {
        "apostate": (
            apostate_command(args, work / "apostate" / "run"),
            ("kl", "total"),
            lambda: work / "apostate" / "run" / "study.journal",
        ),
        "heretic": (
            [str(args.heretic)],
            ("kl_divergence", "n_bad_prompts"),
            lambda: next(iter(sorted(checkpoints.glob("*.jsonl"))), None),
        ),
    }
    for name, (cmd, keys, find_journal) in jobs.items():
        if args.only not in ("both", name):
            continue
        cwd = work / name
        if cwd.exists():
            shutil.rmtree(cwd)  # a fresh run: an old run folder would only be resumed
        cwd.mkdir()
        if name == "heretic":
            (cwd / "config.toml").write_text(heretic_config(args, files), encoding="utf-8")
        run = run_tool(cmd, cwd, tool_env(name), find_journal, args.n_trials, args.grace)
        results[name] = run | read_results(run["journal"], run["started"], *keys)
    for name, r in results.items():
        r["peak_rss_mib"] = r["peak_rss"] / 2**20
        reused = "" if args.only in ("both", name) else f" (from the earlier run started {r['started']})"
        print(
            f"{name}: exit {r['rc']}{' (stopped by harness)' if r['stopped'] else ''}, "
            f"journal {r['journal']}, log {work / name / 'output.log'}{reused}"
        )
    print_table(results, args.max_kl)
    (work / "summary.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    print(f"summary: {work / 'summary.json'}")


if __name__ == "__main__":
    main()
