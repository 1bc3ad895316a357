"""The commented default config file, rendered from the Settings model itself.

`python -m apostate.config_file > config.default.toml` regenerates it; a test keeps the
committed copy in sync, so every field is documented in exactly one place.
"""

from __future__ import annotations

import textwrap

import tomli_w
from pydantic import BaseModel

from .settings import Settings

SKIPPED = {"model", "config"}
HEADER = """\
# apostate configuration. Every setting, with its default.
# Use it with `apostate MODEL --config FILE`, or save it as ./apostate.toml.
# Command-line flags (--kebab-case) and APOSTATE_* environment variables override it.
"""


def render_default_config() -> str:
    lines = [HEADER]
    tables = []
    for name, field in Settings.model_fields.items():
        if name in SKIPPED:
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            tables.append((name, field.description, default))
            continue
        lines.extend(_entry(name, field.description, default))
    for name, description, model in tables:
        lines.append("")
        lines.extend(_comment(description))
        lines.append(f"[{name}]")
        for sub_name, sub_field in type(model).model_fields.items():
            lines.extend(_entry(sub_name, sub_field.description, getattr(model, sub_name)))
    return "\n".join(lines).rstrip() + "\n"


def _comment(text: str | None) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text or "", 88)]


def _entry(name: str, description: str | None, value) -> list[str]:
    lines = [""] + _comment(description)
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
