"""The `save-gguf` action: the chosen trial as a GGUF file, scored as it ships.

Quantizing can undo part of a small edit, so the written file is loaded back through the same
GGUF reader the input goes through and scored like a trial: refusals (the search's short check,
markers; the judge's labels too where one is set) and KL against the base model, on the
evaluation and the held-out prompts, beside the full-precision model on the same prompts. If the
file gives back more than `gguf.max_lost_edit` of the edit's refusal reduction, the run says so
and so does the card.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

from apostate.commands.evaluate import heldout_scorer
from apostate.decoding import CpuKernels
from apostate.model.sources import ModelSource, convert_gguf
from apostate.progress import console
from apostate.results.export import TrialSummary, save_gguf
from apostate.scoring.scorer import Scorer
from apostate.scoring.verdicts import VerdictCounts
from apostate.session import Session, open_model


def save_gguf_export(session: Session, trial, summary: TrialSummary, output: Path) -> Path:
    settings = session.settings
    score = (lambda file: score_shipped(session, trial, file)) if settings.gguf.score else None
    tokenizer = session.loaded.tokenizer
    args = (settings.gguf.type, summary, settings.system_prompt, score)
    return save_gguf(session.source, session.method.deltas(), tokenizer, output, *args)


def score_shipped(session: Session, trial, file: Path) -> dict:
    """Score rows for the card: per prompt split, the full-precision model and the file; kept in
    the study as `gguf_<trial>`."""
    label = f"GGUF {session.settings.gguf.type}"
    base = {"evaluation": session.startup.base_refusals}
    heldout = None
    if session.texts.of("harmful", "heldout") and session.texts.of("harmless", "heldout"):
        heldout, base["held-out"] = _heldout_scorer(session, trial)
    full = {"evaluation": _scores(session.scorer, session.model, session.judge)}
    if heldout is not None:
        full["held-out"] = _scores(heldout, session.model, session.judge)
    with tempfile.TemporaryDirectory(prefix=".gguf-check-", dir=session.run_dir) as folder:
        console.print(f"Loading [bold]{file.name}[/] back to score it as shipped...")
        convert_gguf(file, Path(folder))
        source = ModelSource(file.name, folder)
        kernels = CpuKernels(session.opened.kernels.timer)  # the run's timings; restores only its own layers
        shipped = open_model(source, session.settings, None, session.loaded.tokenizer, kernels, edit=False)
        try:
            model = shipped.loaded.model
            shipped_scores = {"evaluation": _scores(session.scorer, model, session.judge)}
            if heldout is not None:
                shipped_scores["held-out"] = _scores(heldout, model, session.judge)
        finally:
            kernels.restore()
            del shipped, model
            gc.collect()
    rows = {}
    for split, scores in full.items():
        rows[f"{split} (short check), full precision"] = scores
        rows[f"{split} (short check), {label}"] = shipped_scores[split]
    _print_rows(rows)
    lost = lost_edit(base, full, shipped_scores)
    warning = None
    if lost["share"] > session.settings.gguf.max_lost_edit:
        warning = (
            f"The {label} file lost {lost['share']:.0%} of the edit ({lost['split']} prompts: base model "
            f"{lost['base']} refusals, full precision {lost['full']}, this file {lost['shipped']}); "
            "a less quantized type (f16, q8_0) keeps more of it"
        )
        console.print(f"[red bold]{warning}[/]")
    session.study.set_user_attr(f"gguf_{trial.number}", {"rows": rows, "lost": lost, "warning": warning})
    return {"rows": rows, "warning": warning}


def _print_rows(rows: dict) -> None:
    for label, scores in rows.items():
        judged = scores.get("judged")
        verdict = f", judged {judged['refusals']}/{judged['total']}" if judged else ""
        console.print(f"* {label}: refusals {scores['refusals']}/{scores['total']}{verdict}, KL {scores['kl']:.4f}")


def lost_edit(base: dict, full: dict, shipped: dict) -> dict:
    """The share of the edit's refusal reduction (base less full precision) that the file gave back,
    on the split where it is largest (held-out first on ties: more prompts)."""
    worst = None
    for split in sorted(full, key=lambda name: name != "held-out"):
        removed = base[split] - full[split]["refusals"]
        returned = shipped[split]["refusals"] - full[split]["refusals"]
        share = max(returned, 0) / removed if removed > 0 else 0.0
        entry = {"split": split, "share": share, "base": base[split], "full": full[split]["refusals"],
                 "shipped": shipped[split]["refusals"]}  # fmt: skip
        if worst is None or share > worst["share"]:
            worst = entry
    return worst


def _heldout_scorer(session: Session, trial) -> tuple[Scorer, int]:
    """The held-out prompts at the search's settings, the base model's distributions recorded; and
    the base model's refusals on them."""
    scorer = heldout_scorer(session, evaluation=False)
    session.method.reset()
    base = scorer.record_base(session.model)
    session.restore(trial)
    return scorer, base.refusals


def _scores(scorer: Scorer, model, judge) -> dict:
    responses = scorer.responses(model, early_stop=judge is None)
    counts = VerdictCounts.of(scorer.judge.verdicts(scorer.harmful_prompts, responses))
    record = {**counts.as_dict(), "kl": scorer.kl(model)}
    if judge is not None:
        record["judged"] = {**VerdictCounts.of(judge.verdicts(scorer.harmful_prompts, responses)).as_dict()}
        record["judged"]["judge"] = judge.name
    return record
