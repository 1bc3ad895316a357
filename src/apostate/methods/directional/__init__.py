"""Directional ablation: the edit (`method.py`), its weight kernel over layers
(`weight_kernel.py`) and the ranges its parameters are sampled from (`settings.py`)."""
