"""Capabilities of the chosen trial beside the base model's (capabilities/): scored by the
evaluation, kept in the study as `capabilities_<trial>`, and shown as a table."""

from __future__ import annotations

from rich.table import Table

from apostate.capabilities import TASKS
from apostate.capabilities.harness import check_available, item_scores
from apostate.capabilities.paired import paired_difference
from apostate.capabilities.settings import CapabilitySettings
from apostate.progress import console
from apostate.session import Session


def benchmark_trial(session: Session, trial) -> dict | None:
    """The base model and `trial` on the configured tasks (None: no tasks); leaves the trial restored."""
    settings = session.settings.capabilities
    if not settings.tasks:
        return None
    check_available(settings)
    loaded = session.loaded
    console.print(f"Scoring capabilities ({', '.join(settings.tasks)}; {settings.items} items each), base model...")
    session.method.reset()
    base = item_scores(session.model, loaded.tokenizer, settings, loaded.device)
    console.print(f"Scoring capabilities, trial {trial.number}...")
    session.restore(trial)
    edited = item_scores(session.model, loaded.tokenizer, settings, loaded.device)
    record = compare(base, edited, settings)
    print_capabilities(record, f"trial {trial.number}")
    session.study.set_user_attr(f"capabilities_{trial.number}", record)
    return record


def compare(base: dict[str, list[float]], edited: dict[str, list[float]], settings: CapabilitySettings) -> dict:
    """Per task: both accuracies on the same items, and the paired difference (capabilities/paired.py)."""
    return {
        task: {"metric": TASKS[task]["metric"], **paired_difference(base[task], edited[task], TASKS[task]["chance"])}
        for task in settings.tasks
    }


def print_capabilities(record: dict, label: str) -> None:
    table = Table(title=f"Capabilities (lm-eval, zero-shot): base model and {label}")
    for column in ("Task", "Items", "Chance", "Base", label.capitalize(), "Difference (95% interval)", "p"):
        table.add_column(column, justify="left" if column == "Task" else "right")
    for task, row in record.items():
        low, high = row["interval"]
        table.add_row(
            f"{task} ({row['metric']})",
            str(row["items"]),
            f"{row['chance']:.2f}",
            f"{row['base']['accuracy']:.3f} ± {row['base']['stderr']:.3f}",
            f"{row['edited']['accuracy']:.3f} ± {row['edited']['stderr']:.3f}",
            f"{row['difference']:+.3f} [{low:+.3f}, {high:+.3f}]",
            f"{row['p_value']:.2g}",
        )
    console.print(table)
    for task, row in record.items():
        if row["base"]["accuracy"] - row["chance"] < 2 * row["base"]["stderr"]:
            console.print(
                f"[yellow]* {task}: the base model scores near chance ({row['base']['accuracy']:.2f}, chance "
                f"{row['chance']:.2f}): this task cannot show damage on this model[/]"
            )
