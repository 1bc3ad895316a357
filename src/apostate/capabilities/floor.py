"""The capability floor of the search (`[capability_floor]`): a few fixed benchmark items scored
on every trial by teacher-forced passes (choices.py), against the base model's accuracy on them.

    excess = (accuracy_base − accuracy_trial) − max_drop      (> 0: the trial is infeasible)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from apostate.capabilities.choices import ChoiceScorer, load_choice_items
from apostate.capabilities.settings import CapabilityFloorSettings
from apostate.progress import console


@dataclass
class CapabilityFloor:
    scorer: ChoiceScorer
    base_accuracy: float
    max_drop: float

    @classmethod
    def measure(
        cls, model, tokenizer, settings: CapabilityFloorSettings, folder: Path, batch_size: int, device
    ) -> CapabilityFloor:
        """The items, and the unedited `model`'s accuracy on them."""
        items = load_choice_items(settings.tasks, settings.items, folder)
        scorer = ChoiceScorer(tokenizer, items, batch_size, device)
        base = scorer.accuracy(model)
        console.print(
            f"* Capability floor: {len(items)} items ({', '.join(settings.tasks)}), base model {base:.3f}; "
            f"a trial may lose {settings.max_drop:.3f}"
        )
        return cls(scorer, base, settings.max_drop)

    def excess(self, accuracy: float) -> float:
        return (self.base_accuracy - accuracy) - self.max_drop
