"""Multiple-choice items as lm-eval poses them (its task configs, local data), scored by apostate's
own teacher-forced passes (decoding/): cheap enough to run on every trial of the search.

For an item with context x, continuations c_j (the target delimiter, then choice j) and gold g:

    ll_j = Σ_t log p(c_j,t | x, c_j,<t)            (one teacher-forced pass per batch of rows)
    acc = [argmax_j ll_j = g],   acc_norm = [argmax_j ll_j / len(choice j) = g]

(len: the choice's characters, without the delimiter, as lm-eval counts them).

Context and continuation are tokenized as lm-eval does: the whole text at once, the context's
tokens split off its front (trailing spaces of the context move to the continuation).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from apostate.capabilities import TASKS
from apostate.capabilities.harness import task_config
from apostate.decoding import PromptSet


@dataclass(frozen=True)
class ChoiceItem:
    task: str
    context: str
    choices: list[str]
    delimiter: str  # between context and choice
    target: int

    @property
    def continuations(self) -> list[str]:
        return [self.delimiter + choice for choice in self.choices]


def load_choice_items(tasks: list[str], items: int, folder: Path) -> list[ChoiceItem]:
    """The first `items` items of each task, as lm-eval's config for the task poses them."""
    from lm_eval.tasks import TaskManager  # optional dependency (the `capabilities` extra)

    loaded = []
    with tempfile.TemporaryDirectory() as configs:
        paths = {}
        for task in tasks:
            paths[task] = Path(configs) / f"{task}.yaml"
            paths[task].write_text(yaml.safe_dump(task_config(task, folder)))
        built = TaskManager().load([str(path) for path in paths.values()])
    by_name = built["tasks"]
    for name in tasks:
        task = by_name[f"apostate_{name}"]
        delimiter = task.config.target_delimiter
        for doc in list(task.eval_docs)[:items]:
            choices = task.doc_to_choice(doc)
            target = task.doc_to_target(doc)
            target = choices.index(target) if isinstance(target, str) else int(target)
            loaded.append(ChoiceItem(name, task.doc_to_text(doc), list(choices), delimiter, target))
    return loaded


def split_pair(tokenizer, context: str, continuation: str) -> tuple[str, list[int]]:
    """(context text, continuation token ids) as lm-eval splits a request."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    own = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context, whole[len(own) :]


class ChoiceScorer:
    """The items' accuracy under a model: every (item, choice) row teacher-forced, one pass per batch."""

    def __init__(self, tokenizer, items: list[ChoiceItem], batch_size: int, device):
        self.items = items
        rows = [split_pair(tokenizer, item.context, c) for item in items for c in item.continuations]
        prompts = PromptSet(tokenizer, [context for context, _ in rows], batch_size, device)
        self.answers = [answer for _, answer in rows]
        self.rows = prompts.continued(self.answers)

    def correct(self, model, edited_layers: set[int] | None = None) -> list[float]:
        """Per item, 1.0 where the model's best choice (by the task's metric) is the gold one."""
        loglikelihoods = [float(own.sum()) for own in self.rows.answer_token_logprobs(model, edited_layers)]
        scores, start = [], 0
        for item in self.items:
            own = loglikelihoods[start : start + len(item.choices)]
            start += len(item.choices)
            if TASKS[item.task]["metric"] == "acc_norm":
                own = [value / len(choice) for value, choice in zip(own, item.choices, strict=True)]
            scores.append(float(own.index(max(own)) == item.target))
        return scores

    def accuracy(self, model, edited_layers: set[int] | None = None) -> float:
        scores = self.correct(model, edited_layers)
        return sum(scores) / len(scores)
