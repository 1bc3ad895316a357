"""Ablation methods, registered by name. Each one samples a trial's parameters and writes its
edit into the model (through the LoRA adapter, or in place with an in-memory copy to reset
from); the trial loop, scoring, study, Pareto selection and export are shared.

The table is plain data (it imports nothing), so the settings read the method names and each
method's settings table from it without loading torch; `protocol.method_class` loads a method.
A method's knobs live in its own settings table, which only its runs measure.
"""

# name -> ("module:Class", the method's table in the settings)
METHODS: dict[str, tuple[str, str]] = {
    "directional": ("apostate.methods.directional.method:DirectionalMethod", "directional"),
    "ara": ("apostate.methods.ara.full:AraMethod", "ara"),
    "ara-lora": ("apostate.methods.ara.lora:AraLoraMethod", "ara"),
}

__all__ = ["METHODS"]
