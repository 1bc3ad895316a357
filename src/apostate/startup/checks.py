"""Checks before the first trial: what would make a run measure nonsense without failing.

Each finding is one line: an error (ApostateError) where the run cannot mean anything, a
warning where it still can but a user should know (progress.warn). The warnings drawn from
measurements are kept with them (`Startup.warnings`), so a resumed run says them again.

- the chat: the rendered chat of the first prompt is shown once; a template that drops the
  user's message or opens no assistant turn is an error, one that drops the system prompt a
  warning (model/chat_template.py);
- prompts that hold the tokenizer's special tokens (they become turn markers, not text);
- prompts too long for the model's context: left out of the run (see `fit_to_context`);
- a response prefix that swallows the answers (`prefix_findings`);
- a base model that refuses almost nothing, or many harmless prompts (`base_findings`);
- refusal directions that are noise: the direction from half the direction prompts against
  the other half's (`direction_findings`).
"""

from __future__ import annotations

from dataclasses import replace

from apostate.errors import ApostateError
from apostate.model.chat_template import check_rendering
from apostate.progress import console, warn
from apostate.prompts import PromptSplit, PromptSplits, Texts
from apostate.settings import Settings
from apostate.startup.check_settings import StartupChecks

SUBSETS = ("direction", "evaluation", "heldout")
PREFIX_WARN_TOKENS = 6  # a template's preamble ("<think></think>", "Assistant:") is shorter than this


def check_prompts(tokenizer, settings: Settings, prompts: PromptSplits) -> None:
    """What needs only the tokenizer, before the model loads: the chat template and the prompts' text."""
    check_chat(tokenizer, settings, Texts(tokenizer, settings, prompts, ""))
    for message in special_token_findings(tokenizer, prompts):
        warn(message)


def model_context(model) -> int | None:
    """The longest sequence the model was made for (max_position_embeddings), where it says."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(config, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


def check_chat(tokenizer, settings: Settings, texts: Texts) -> None:
    """The template renders each prompt as a user turn followed by an open assistant turn, and
    the first harmful evaluation prompt is shown as the model sees it (before any response prefix)."""
    sides = (settings.harmless, settings.harmful)
    systems = {spec.system_prompt if spec.system_prompt is not None else settings.system_prompt for spec in sides}
    found = [message for system in sorted(systems, key=str) for message in check_rendering(tokenizer, system)]
    for message in dict.fromkeys(found):  # once, however many sides share the system prompt
        warn(message)
    first = texts.of("harmful", "evaluation")[0]
    console.print(f"* The chat as the model sees it (first harmful evaluation prompt): {first!r}", markup=False)


def special_token_findings(tokenizer, prompts: PromptSplits) -> list[str]:
    """Prompts that hold the tokenizer's special tokens as text: the tokenizer reads them as
    turn markers, so such a prompt can close its own turn or open another."""
    special = sorted({t for t in tokenizer.all_special_tokens if len(t) > 1} | set(_added_specials(tokenizer)))
    findings = []
    for side in ("harmless", "harmful"):
        split: PromptSplit = getattr(prompts, side)
        held = [(p, t) for subset in SUBSETS for p in getattr(split, subset) for t in special if t in p]
        count = len({p for p, _ in held})
        if count:
            prompt, token = held[0]
            findings.append(
                f"{count} {side} prompt{'s hold' if count != 1 else ' holds'} the tokenizer's special token {token!r} as text "
                f"(first: {_short(prompt)!r}); it is read as a turn marker, not as words, so such a prompt can end its "
                "own turn: remove the token from the prompts if it is not meant"
            )
    return findings


def _added_specials(tokenizer) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return [token.content for token in decoder.values() if getattr(token, "special", False) and len(token.content) > 1]


def fit_to_context(tokenizer, settings: Settings, prompts: PromptSplits, context: int | None) -> PromptSplits:
    """The rule for prompts the model cannot read whole: a prompt whose chat, with
    `max_response_tokens` of answer after it, is longer than the model's context is left out
    of the run (each subset keeps its other prompts), with one warning per side naming how
    many and the longest; a subset left with no prompt at all is an error."""
    if not context:
        return prompts
    room = context - settings.max_response_tokens
    texts = Texts(tokenizer, settings, prompts, "")
    kept = {}
    for side in ("harmless", "harmful"):
        split: PromptSplit = getattr(prompts, side)
        subsets, dropped = {}, []
        for subset in SUBSETS:
            chats = texts.of(side, subset)
            lengths = [len(ids) for ids in tokenizer(chats, add_special_tokens=False)["input_ids"]] if chats else []
            pairs = list(zip(getattr(split, subset), lengths, strict=True))
            subsets[subset] = [prompt for prompt, length in pairs if length <= room]
            dropped += [length for _, length in pairs if length > room]
            if pairs and not subsets[subset]:
                raise ApostateError(
                    f"every {side} {subset} prompt is longer than the model's context ({context} tokens, less "
                    f"{settings.max_response_tokens} for the answer); give shorter prompts or lower --max-response-tokens"
                )
        if dropped:
            warn(
                f"{len(dropped)} {side} prompt{'s do' if len(dropped) != 1 else ' does'} not fit the model's context "
                f"({context} tokens, less {settings.max_response_tokens} for the answer; longest {max(dropped)} "
                "tokens): they are left out of the run"
            )
        kept[side] = PromptSplit(**subsets)
    return replace(prompts, **kept)


def prefix_findings(prefix: str, detected: bool, is_thinking_block: bool, responses: list[str], tokenizer) -> list[str]:
    """A response prefix that is most of the answer. Every sampled response alike (the prefix
    covers a whole one) means the model is not reading the prompts: an error. A long detected
    prefix (not a thinking block) may be part of the answer, which scoring then never sees."""
    if detected and len(set(responses)) == 1 and len(responses) > 1:
        raise ApostateError(
            f"the model gives the same answer to every sampled prompt ({_short(responses[0])!r}), so it is not "
            "reading them; check the chat shown above and the chat template, or set --response-prefix"
        )
    if not detected or is_thinking_block or not prefix:
        return []
    tokens = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    if tokens <= PREFIX_WARN_TOKENS:
        return []
    return [
        f"the detected response prefix is {tokens} tokens long ({_short(prefix)!r}): every sampled response starts "
        "with it, and scoring skips it; if it is part of the answer (a refusal, say), set --response-prefix ''"
    ]


def base_findings(
    refused: int, total: int, harmless_refused: int, harmless_total: int, checks: StartupChecks
) -> list[str]:
    """A base model that refuses few harmful prompts leaves little to remove (and its refusal
    direction comes from prompts it answers); one that refuses harmless prompts refuses more
    than harm, so the direction mixes both."""
    findings = []
    if total and refused / total < checks.min_base_refusal_share:
        findings.append(
            f"the base model refuses only {refused}/{total} harmful evaluation prompts (below "
            f"{checks.min_base_refusal_share:.0%}): there is little refusal to remove, so trials differ by noise; "
            "check the chat template and system prompt, or use prompts this model refuses"
        )
    if harmless_total and harmless_refused / harmless_total > checks.max_base_harmless_refusal_share:
        findings.append(
            f"the base model refuses {harmless_refused} of {harmless_total} sampled harmless prompts (above "
            f"{checks.max_base_harmless_refusal_share:.0%}): the harmless set is not harmless to it, or the refusal "
            "markers match ordinary answers; the refusal direction then mixes the two"
        )
    return findings


def direction_findings(agreement: list[float], minimum: float) -> list[str]:
    """`agreement`: per decoder layer, the cosine between the refusal direction measured on one
    half of the direction prompts and on the other. Low everywhere: the direction is noise."""
    if not agreement:
        return []
    best = max(range(len(agreement)), key=agreement.__getitem__)
    if agreement[best] >= minimum:
        return []
    return [
        f"harmless and harmful residuals barely differ: the refusal direction from half of the direction prompts "
        f"agrees with the other half's at cosine {agreement[best]:.2f} at best (layer {best}; below {minimum} it is "
        "mostly noise); use more direction prompts (direction_count) or prompt sets that differ in what they ask"
    ]


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
