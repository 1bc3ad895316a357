"""What the run report needs of the chosen trial that only the loaded model can tell, kept in the
study (user attribute `chosen`) so `apostate report` can draw it later without loading anything:
the size of the edit per layer and component, and response pairs (base model, chosen trial)."""

from __future__ import annotations

import torch
from optuna.trial import FixedTrial

from apostate.decoding.generation import generate_plain
from apostate.progress import console
from apostate.session import Session

SAMPLE_COUNT = 3  # prompts per side
SAMPLE_TOKENS = 96  # long enough to see what an answer is, short enough to stay cheap


def record_chosen(session: Session, trial) -> None:
    """Store the chosen trial's edit profile and response pairs in the study."""
    console.print("Writing down the chosen trial's edit and a few responses for the report...")
    pairs = response_pairs(session, trial)  # resets the model, then restores the trial
    chosen = {
        "number": trial.number,
        "pick_max_kl": session.settings.pick_max_kl,
        "edit_norms": edit_norms(session.method.deltas(), session.opened.architecture.n_layers),
        "layer_profile": session.method.layer_profile(session.method.suggest(FixedTrial(trial.params))),
        "samples": pairs,
    }
    session.study.set_user_attr("chosen", chosen)


@torch.no_grad()
def edit_norms(deltas, n_layers: int) -> dict[str, list[float]]:
    """Frobenius norm of the weight change per decoder layer, per component: ‖ΔW‖_F summed in
    quadrature over the component's writers in that layer (0 where nothing changed)."""
    squares: dict[str, list[float]] = {}
    for edit in deltas:
        per_layer = squares.setdefault(edit.writer.component, [0.0] * n_layers)
        per_layer[edit.writer.layer] += float(edit.compute().float().pow(2).sum())
    return {component: [value**0.5 for value in values] for component, values in sorted(squares.items())}


def response_pairs(session: Session, trial) -> list[dict]:
    """The base model's and the trial's responses to the first few held-out prompts of each side
    (evaluation prompts where there are no held-out ones)."""
    texts, prompts = session.texts, session.texts.prompts
    chosen = {}
    for side in ("harmless", "harmful"):
        split = getattr(prompts, side)
        subset = "heldout" if split.heldout else "evaluation"
        count = min(SAMPLE_COUNT, len(getattr(split, subset)))
        chosen[side] = (getattr(split, subset)[:count], texts.of(side, subset)[:count])
    responses = {}
    for state in ("base", "edited"):
        if state == "base":
            session.method.reset()
        else:
            session.restore(trial)
        harmless, harmful = chosen["harmless"][1], chosen["harmful"][1]
        both = _generate(session, harmless + harmful)  # one batch: half the decoding passes of two
        responses[state, "harmless"], responses[state, "harmful"] = both[: len(harmless)], both[len(harmless) :]
    return [
        {"side": side, "prompt": prompt, "base": base, "edited": edited}
        for side, (plain, _) in chosen.items()
        for prompt, base, edited in zip(plain, responses["base", side], responses["edited", side], strict=True)
    ]


def _generate(session: Session, templated: list[str]) -> list[str]:
    loaded = session.loaded
    batch_size = session.startup.batch_size
    return generate_plain(session.model, loaded.tokenizer, templated, SAMPLE_TOKENS, batch_size, loaded.device)
