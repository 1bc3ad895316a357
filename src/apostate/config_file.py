"""The commented default config file, rendered from the Settings model itself.

`python -m apostate.config_file > config.default.toml` regenerates it; a test keeps the
committed copy in sync, so every field is documented in exactly one place.
"""

from __future__ import annotations

import textwrap

import tomli_w
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from apostate.measured import METHODS, measured_for
from apostate.settings import Settings

SKIPPED = {"model", "config"}
HEADER = """\
# apostate configuration. Every setting, with its default.
# Use it with `apostate MODEL --config FILE`, or save it as ./apostate.toml.
# Command-line flags (--kebab-case) and APOSTATE_* environment variables override it.
"""
MEASURED = "Changes what a trial measures{scope}: a run folder made with another value will not resume."


def render_default_config() -> str:
    lines = [HEADER]
    tables = []
    for name, field in Settings.model_fields.items():
        if name in SKIPPED:
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            tables.append((name, field, default))
            continue
        lines.extend(_entry(name, _notes(field), default))
    for name, field, model in tables:
        lines.extend(_table(name, field, model))
    return "\n".join(lines).rstrip() + "\n"


def _table(name: str, field: FieldInfo, model: BaseModel) -> list[str]:
    """`[name]` with its entries, then its own tables as `[name.sub]`."""
    lines = ["", *_notes(field), f"[{name}]"]
    nested = []
    for sub_name, sub_field in type(model).model_fields.items():
        value = getattr(model, sub_name)
        if isinstance(value, BaseModel):
            nested.append((f"{name}.{sub_name}", sub_field, value))
        else:
            lines.extend(_entry(sub_name, _notes(sub_field), value))
    for args in nested:
        lines.extend(_table(*args))
    return lines


def _notes(field: FieldInfo) -> list[str]:
    """A field's comment lines: its description, and whether it changes what a trial measures."""
    texts = [field.description or ""]
    methods = measured_for(field)
    if methods:
        scope = "" if set(methods) == set(METHODS) else " (methods " + ", ".join(f"'{m}'" for m in methods) + ")"
        texts.append(MEASURED.format(scope=scope))
    return ["# " + line for text in texts for line in textwrap.wrap(text, 88)]


def _entry(name: str, notes: list[str], value) -> list[str]:
    lines = ["", *notes]
    if value is None:
        lines.append(f"# {name} =  (unset)")
        return lines
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        value = [list(item) if isinstance(item, tuple) else item for item in value]
    lines.append(tomli_w.dumps({name: _plain(value)}, multiline_strings=False).rstrip())
    return lines


def _plain(value):
    from pathlib import Path

    return str(value) if isinstance(value, Path) else value


if __name__ == "__main__":
    print(render_default_config(), end="")
