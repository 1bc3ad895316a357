"""The report's pictures, each drawn from stored data only (matplotlib, no display needed).

Every function takes what it draws and a PNG path, writes the file and returns the path."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import optuna

from apostate.search.pareto import BaseScores, failures, judged_counts, pareto_trials
from apostate.search.study import completed
from apostate.search.trial_record import TrialRecord

KL_FLOOR = 1e-6  # a log axis cannot show 0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


def failure_rate(trial: optuna.trial.FrozenTrial) -> float:
    return failures(trial) / TrialRecord.of(trial).total


def plot_front(study: optuna.Study, base: BaseScores, path: Path, chosen: int | None = None) -> Path:
    """All trials (KL on a log axis), the Pareto front as a line labelled with trial numbers (and
    the judge's counts as crosses where it re-scored the front), the chosen trial starred, the
    base model's rate dashed."""
    plt = _pyplot()
    trials = completed(study)
    front = sorted(pareto_trials(study), key=lambda t: TrialRecord.of(t).kl)
    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    kl = [max(TrialRecord.of(t).kl, KL_FLOOR) for t in trials]
    axes.scatter(kl, [failure_rate(t) for t in trials], s=14, alpha=0.45, label="trials")
    front_kl = [max(TrialRecord.of(t).kl, KL_FLOOR) for t in front]
    axes.plot(front_kl, [failure_rate(t) for t in front], "o-", color="crimson", label="Pareto front")
    for trial, x in zip(front, front_kl, strict=True):
        axes.annotate(
            str(trial.number), (x, failure_rate(trial)), textcoords="offset points", xytext=(4, 5), fontsize=8
        )
    judged = [(t, judged_counts(study, t.number)) for t in front]
    judged = [(t, counts) for t, counts in judged if counts]
    if judged:
        axes.scatter(
            [max(TrialRecord.of(t).kl, KL_FLOOR) for t, _ in judged],
            [(c["refusals"] + c["broken"]) / c["total"] for _, c in judged],
            marker="x",
            s=40,
            color="black",
            label="Pareto front, judged",
        )
    picked = next((t for t in trials if t.number == chosen), None)
    if picked is not None:
        axes.scatter(
            [max(TrialRecord.of(picked).kl, KL_FLOOR)],
            [failure_rate(picked)],
            marker="*",
            s=260,
            facecolor="gold",
            edgecolor="black",
            zorder=5,
            label=f"chosen (trial {picked.number})",
        )
    axes.axhline(base.refusal_rate, linestyle="--", color="gray", label="base model")
    axes.set_xscale("log")
    axes.set_xlabel("KL divergence from the base model (harmless prompts)")
    axes.set_ylabel("refused or broken (share of harmful prompts)")
    axes.set_title(f"{len(trials)} trials; Pareto front labelled with trial numbers")
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_edit(profile: dict, edit_norms: dict[str, list[float]] | None, path: Path) -> Path | None:
    """The chosen edit over layers: the method's own weight per layer and component, where it has
    one, and the Frobenius norm of the weight change per layer and component (any method); the
    range of layers the method edits shaded, where it edits a range (`Method.layer_profile`)."""
    weights = profile.get("weights")
    panels = [kind for kind, present in (("weights", weights), ("norms", edit_norms)) if present]
    if not panels:
        return None
    plt = _pyplot()
    figure, axes_list = plt.subplots(len(panels), 1, figsize=(7.5, 2.8 * len(panels)), sharex=True, squeeze=False)
    for axes, panel in zip(axes_list[:, 0], panels, strict=True):
        series = weights if panel == "weights" else edit_norms
        for component, values in series.items():
            axes.plot(range(len(values)), values, "o-", markersize=3, label=component)
        if panel == "weights":
            axes.set_ylabel("edit weight")
            axes.set_title("Edit weight per layer (the trial's parameters)")
        else:
            axes.set_ylabel("‖ΔW‖ (Frobenius)")
            axes.set_title("Size of the weight change per layer")
        if "layers" in profile:
            first, last = profile["layers"]
            axes.axvspan(first - 0.5, last + 0.5, color="gold", alpha=0.15, label="edited layers")
        axes.legend(fontsize=8)
    axes_list[-1, 0].set_xlabel("decoder layer")
    return _save(figure, path)


def best_so_far(trials: list[optuna.trial.FrozenTrial], max_kl: float) -> list[tuple[int, timedelta, float | None]]:
    """(trial number, time since the first trial started, lowest failure rate so far among trials
    with KL <= max_kl, or None while there is none), in order of completion."""
    ordered = sorted(trials, key=lambda t: t.datetime_complete)
    start = min(t.datetime_start for t in ordered)
    best, rows = None, []
    for trial in ordered:
        if TrialRecord.of(trial).kl <= max_kl:
            rate = failure_rate(trial)
            best = rate if best is None else min(best, rate)
        rows.append((trial.number, trial.datetime_complete - start, best))
    return rows


def plot_progress(trials: list[optuna.trial.FrozenTrial], max_kl: float, base_rate: float, path: Path) -> Path:
    """Search progress: the best failure rate within the pick limit, against trial number and wall time."""
    plt = _pyplot()
    rows = best_so_far(trials, max_kl)
    figure, (by_trial, by_time) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    numbers = [n for n, _, best in rows if best is not None]
    minutes = [elapsed.total_seconds() / 60 for _, elapsed, best in rows if best is not None]
    bests = [best for *_, best in rows if best is not None]
    by_trial.step(numbers, bests, where="post", color="crimson")
    by_trial.set_xlabel("trial number")
    by_trial.set_ylabel(f"best share refused or broken\n(trials with KL <= {max_kl:g})")
    by_time.step(minutes, bests, where="post", color="crimson")
    by_time.set_xlabel("minutes since the first trial started")
    for axes in (by_trial, by_time):
        axes.axhline(base_rate, linestyle="--", color="gray", label="base model")
        axes.set_ylim(bottom=0)
        axes.legend(fontsize=8)
    figure.suptitle("Search progress")
    return _save(figure, path)


def plot_phases(phases: dict, path: Path) -> Path:
    """Seconds and peak resident memory of each phase of the run (the last run over this folder)."""
    plt = _pyplot()
    records = phases["phases"]
    names = [r["name"] for r in records]
    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(10, 0.45 * len(names) + 1.6), sharey=True)
    time_axes.barh(names, [r["seconds"] for r in records], color="steelblue")
    time_axes.set_xlabel("seconds")
    memory_axes.barh(names, [r["peak_rss"] / 2**30 for r in records], color="darkseagreen", label="peak RSS")
    gpu = [(r["peak_gpu"] or 0) / 2**30 for r in records]
    if any(gpu):
        memory_axes.barh(names, gpu, color="orange", alpha=0.7, label="peak GPU")
        memory_axes.legend(fontsize=8)
    memory_axes.set_xlabel("GiB")
    time_axes.invert_yaxis()  # the run's order, top to bottom
    figure.suptitle("Time and memory per phase")
    return _save(figure, path)


def plot_scores(rows: list[tuple[str, float, float | None]], path: Path) -> Path:
    """Grouped bars: (label, refusal share by markers, by the judge or None) for the base model and
    the chosen trial on the evaluation and held-out prompts."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 3.8))
    positions = range(len(rows))
    has_judge = any(judged is not None for _, _, judged in rows)
    width = 0.38 if has_judge else 0.6
    offset = width / 2 if has_judge else 0
    bars = axes.bar([p - offset for p in positions], [markers for _, markers, _ in rows], width, label="markers")
    axes.bar_label(bars, fmt="%.2f", fontsize=8)
    if has_judge:
        judged = [j if j is not None else 0 for _, _, j in rows]
        bars = axes.bar([p + offset for p in positions], judged, width, label="judge", color="dimgray")
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(list(positions), [label for label, _, _ in rows], fontsize=8)
    axes.set_ylabel("refused or broken (share)")
    axes.set_ylim(0, 1.05)
    axes.set_title("Base model and chosen trial: evaluation and held-out prompts")
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_capabilities(record: dict, path: Path) -> Path:
    """Per task: the base model's and the chosen trial's accuracy (± standard error) on the same
    items, chance dashed; the paired difference and its 95% interval under each task's name."""
    plt = _pyplot()
    tasks = list(record)
    figure, axes = plt.subplots(figsize=(max(4.5, 1.8 * len(tasks)), 3.8))
    width = 0.38
    for offset, side, color in ((-width / 2, "base", "tab:blue"), (width / 2, "edited", "tab:orange")):
        values = [record[task][side]["accuracy"] for task in tasks]
        errors = [record[task][side]["stderr"] for task in tasks]
        label = "base model" if side == "base" else "chosen trial"
        bars = axes.bar([i + offset for i in range(len(tasks))], values, width, yerr=errors, capsize=3,
                        color=color, label=label)  # fmt: skip
        axes.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    for index, task in enumerate(tasks):
        axes.hlines(record[task]["chance"], index - 0.45, index + 0.45, colors="gray", linestyles="dashed")
    labels = [
        f"{task}\n{row['difference']:+.3f} [{row['interval'][0]:+.3f}, {row['interval'][1]:+.3f}]"
        for task, row in record.items()
    ]
    axes.set_xticks(range(len(tasks)), labels, fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("accuracy")
    axes.set_title("Capabilities (lm-eval, same items): chance dashed, difference [95%] below", fontsize=9)
    axes.legend(fontsize=8)
    return _save(figure, path)
