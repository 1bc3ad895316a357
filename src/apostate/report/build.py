"""Assemble the report: draw the pictures into `<run_dir>/report/`, then write index.html around them."""

from __future__ import annotations

import os
from html import escape
from pathlib import Path

import optuna

from apostate.report import figures
from apostate.report.data import RunData, load_run
from apostate.report.page import front_table, image, page, samples_html, table
from apostate.scoring.verdicts import VerdictCounts
from apostate.search.pareto import count_text, kl_text
from apostate.search.trial_record import TrialRecord


def build_report(run_dir: Path, study: optuna.Study | None = None) -> Path:
    """Write `<run_dir>/report/index.html` and its PNGs; return the page's path. `study`: the run's
    (default: the one the run folder names)."""
    data = load_run(Path(run_dir), study)
    folder = data.run_dir / "report"
    folder.mkdir(exist_ok=True)
    chosen = data.chosen_trial
    sections = [
        ("Pareto front", _front_section(data, folder)),
        ("Scores of the chosen trial", _scores_section(data, folder)),
        ("Capabilities", _capabilities_section(data, folder)),
        ("The chosen edit over layers", _edit_section(data, folder)),
        ("Search progress", _progress_section(data, folder)),
        ("Time and memory", _phases_section(data, folder)),
        ("Responses: base model and chosen trial", samples_html(data.chosen.get("samples", [])) if data.chosen else ""),
    ]
    title = f"apostate report: {data.model_name}"
    html = page(title, sections, _summary(data, chosen))
    path = folder / "index.html"
    scratch = path.with_suffix(f".html.{os.getpid()}.partial")  # workers sharing a run folder write apart
    scratch.write_text(html, encoding="utf-8")
    os.replace(scratch, path)
    return path


def _summary(data: RunData, chosen) -> str:
    method = f", method <b>{escape(data.method)}</b>" if data.method else ""
    lines = [
        f"<p>Model <b>{escape(data.model_name)}</b>{method}: {len(data.trials)} finished trials, "
        f"{len(data.front)} on the Pareto front. The base model refuses "
        f"{data.base.refusals}/{data.base.total} harmful evaluation prompts.</p>"
    ]
    if chosen is not None:
        attrs = TrialRecord.of(chosen)
        lines.append(
            f"<p>Chosen: <b>trial {chosen.number}</b>, refusals {attrs.refusals}/{attrs.total}, "
            f"broken {attrs.broken}, KL {kl_text(attrs.kl)} (evaluation prompts).</p>"
        )
    else:
        lines.append('<p class="note">No trial was chosen yet (the run has not acted on one).</p>')
    return "".join(lines)


def _front_section(data: RunData, folder: Path) -> str:
    number = data.chosen_trial.number if data.chosen_trial else None
    png = figures.plot_front(data.study, data.base, folder / "front.png", number)
    return image(png, "Pareto front") + front_table(data)


def _scores_section(data: RunData, folder: Path) -> str:
    """Evaluation and held-out scores of the chosen trial beside the base model's: a gap between the
    two sets is over-fitting to the evaluation prompts."""
    chosen = data.chosen_trial
    if chosen is None:
        return ""
    attrs = TrialRecord.of(chosen)
    base_judged, judged, heldout = data.judged("base"), data.judged(chosen.number), data.heldout(chosen.number)
    rows = [
        ("evaluation, base", data.base.refusal_rate, _rate(base_judged)),
        ("evaluation, chosen", (attrs.refusals + attrs.broken) / attrs.total, _rate(judged)),
    ]
    table_rows = [
        ["evaluation", "base model", f"{data.base.refusals}/{data.base.total}", "-", _text(base_judged), "0"],
        ["evaluation", f"trial {chosen.number}", f"{attrs.refusals}/{attrs.total}", str(attrs.broken),
         _text(judged), kl_text(attrs.kl)],
    ]  # fmt: skip
    if heldout:
        rows += [
            ("held-out, base", _heldout_rate(heldout, "base_"), _rate(heldout.get("base_judged"))),
            ("held-out, chosen", _heldout_rate(heldout, ""), _rate(heldout.get("judged"))),
        ]
        table_rows += _heldout_rows(heldout, chosen.number)
    shipped = data.gguf(chosen.number)
    table_rows += _gguf_rows(shipped["rows"], chosen.number) if shipped else []
    png = figures.plot_scores(rows, folder / "scores.png")
    headers = ["Prompts", "Model", "Refusals (markers)", "Broken", "Judged", "KL divergence"]
    html = image(png, "scores") + table(headers, table_rows, {0, 1})
    if shipped and shipped.get("warning"):
        html += f'<p class="note"><b>{escape(shipped["warning"])}.</b></p>'
    if not heldout:
        html += '<p class="note">No held-out evaluation yet: run the "evaluate" action to see over-fitting.</p>'
    elif "full" in heldout:
        html += _heldout_extra(heldout, chosen.number)
    if heldout and heldout.get("categories"):
        category_rows = [
            [name, f"{row['refusals']}/{row['total']}", str(row.get("evasive", 0)), str(row["broken"])]
            for name, row in heldout["categories"].items()
        ]
        html += f"<h3>Held-out answers by category ({escape(heldout['categories_judge'])})</h3>"
        html += table(["Category", "Refused", "Evasive", "Broken"], category_rows, {0})
    return html


def _heldout_rows(heldout: dict, number: int) -> list[list[str]]:
    """The search's short check on the held-out prompts, base model and trial."""
    total = heldout["total"]
    return [
        ["held-out", "base model", f"{heldout['base_refusals']}/{total}", "-", _text(heldout.get("base_judged")), "0"],
        ["held-out", f"trial {number}", f"{heldout['refusals']}/{total}", str(heldout["broken"]),
         _text(heldout.get("judged")), kl_text(heldout["kl"])],
    ]  # fmt: skip


def _gguf_rows(rows: dict, number: int) -> list[list[str]]:
    """The GGUF export scored as shipped, beside the full-precision model on the same prompts."""
    table_rows = []
    for label, row in rows.items():
        split, model = label.split(" (short check), ")
        table_rows.append([split, f"trial {number}, {model}", f"{row['refusals']}/{row['total']}",
                           str(row["broken"]), _text(row.get("judged")), kl_text(row["kl"])])  # fmt: skip
    return table_rows


def _heldout_extra(heldout: dict, number: int) -> str:
    """What only the held-out evaluation reads: full-length answers, over-refusals, KL at both lengths."""
    tokens = heldout["full"]["tokens"]
    rows = [
        ["base model", _text(heldout["base_full"]), _over(heldout["base_over_refusals"]), "0", "0"],
        [f"trial {number}", _text(heldout["full"]), _over(heldout["over_refusals"]),
         kl_text(heldout["first_token_kl"]), kl_text(heldout["kl"]) if heldout.get("kl_tokens", 1) > 1 else "-"],
    ]  # fmt: skip
    headers = [
        "Model",
        f"Refused at {tokens} tokens (markers)",
        "Over-refusals (harmless)",
        "KL (first token)",
        f"KL ({heldout.get('kl_tokens', 1)} tokens)",
    ]
    return "<h3>Held-out, answers read in full</h3>" + table(headers, rows, {0})


def _heldout_rate(heldout: dict, prefix: str) -> float:
    """Share refused or broken: at full length where measured, else by the short check."""
    if f"{prefix}full" in heldout:
        return _rate(heldout[f"{prefix}full"])
    refused = heldout["base_refusals"] if prefix else heldout["refusals"] + heldout["broken"]
    return refused / heldout["total"]


def _over(counts: dict) -> str:
    return f"{counts['refusals']}/{counts['total']}"


def _capabilities_section(data: RunData, folder: Path) -> str:
    chosen = data.chosen_trial
    record = data.capabilities(chosen.number) if chosen is not None else None
    if not record:
        return ""
    png = figures.plot_capabilities(record, folder / "capabilities.png")
    rows = [
        [f"{task} ({row['metric']})", str(row["items"]), f"{row['chance']:.2f}",
         f"{row['base']['accuracy']:.3f} ± {row['base']['stderr']:.3f}",
         f"{row['edited']['accuracy']:.3f} ± {row['edited']['stderr']:.3f}",
         f"{row['difference']:+.3f} [{row['interval'][0]:+.3f}, {row['interval'][1]:+.3f}]", f"{row['p_value']:.2g}"]
        for task, row in record.items()
    ]  # fmt: skip
    headers = ["Task", "Items", "Chance", "Base model", f"Trial {chosen.number}", "Difference (95%)", "p"]
    return image(png, "capabilities") + table(headers, rows, {0})


def _rate(counts: dict | None) -> float | None:
    return VerdictCounts.from_dict(counts).failures / counts["total"] if counts else None


def _text(counts: dict | None) -> str:
    return count_text(counts) if counts else "-"


def _edit_section(data: RunData, folder: Path) -> str:
    chosen = data.chosen_trial
    if chosen is None:
        return ""
    # Runs before layer profiles were recorded have the norms alone.
    png = figures.plot_edit(data.chosen.get("layer_profile", {}), data.chosen.get("edit_norms"), folder / "edit.png")
    return image(png, "edit over layers")


def _progress_section(data: RunData, folder: Path) -> str:
    png = figures.plot_progress(data.trials, data.pick_max_kl, data.base.refusal_rate, folder / "progress.png")
    return image(png, "search progress")


def _phases_section(data: RunData, folder: Path) -> str:
    if not data.phases:
        return ""
    png = figures.plot_phases(data.phases, folder / "phases.png")
    rows = [[r["name"], f"{r['seconds']:.1f}", f"{r['peak_rss'] / 2**30:.2f} GiB"] for r in data.phases["phases"]]
    medians = data.phases.get("trial_medians", {})
    rows += [[f"per trial: {name} (median)", f"{seconds:.2f}", ""] for name, seconds in medians.items()]
    return image(png, "phases") + table(["Phase", "Seconds", "Peak RSS"], rows, {0})
