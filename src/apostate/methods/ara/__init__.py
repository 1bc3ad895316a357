"""Arbitrary-Rank Ablation: both forms (`full.py` in the weights, `lora.py` as LoRA factors),
what they share (`shared.py`), the objective (`objective.py`), the module captures it fits to
(`captures.py`, `expert_captures.py`) and its settings (`settings.py`)."""
