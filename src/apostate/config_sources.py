"""Where the settings come from besides the model's fields: the TOML file (`--config FILE`, else
./apostate.toml if present), and the command line's parser (a mistyped flag is one line)."""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, TomlConfigSettingsSource

from apostate.errors import ApostateError, first_line

LOCAL_CONFIG = Path("apostate.toml")


def find_config_file(argv: list[str]) -> Path | None:
    """The TOML file named by `--config`, else ./apostate.toml if it exists."""
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return Path(argv[index + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return LOCAL_CONFIG if LOCAL_CONFIG.is_file() else None


def chosen_config_file(init_kwargs: dict[str, Any]) -> Path | None:
    """The TOML file of `Settings(**init_kwargs)`: `config=` (None: no file), else ./apostate.toml if it exists."""
    if "config" not in init_kwargs:
        return LOCAL_CONFIG if LOCAL_CONFIG.is_file() else None
    if init_kwargs["config"] is None:
        return None
    path = Path(init_kwargs["config"])
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} is not a file")
    return path


def toml_source(settings_cls: type[BaseSettings], path: Path) -> TomlConfigSettingsSource:
    """The TOML file's settings (read here, at once); a file that does not parse is one line naming it."""
    try:
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    except UnicodeDecodeError:
        raise ApostateError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    except ValueError as error:
        # tomllib.TOMLDecodeError (tomli's before Python 3.11); its text ends "(at line L, column C)".
        raise ApostateError(f"config file {path} is not valid TOML: {first_line(error)}; fix it there") from None


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistyped flag is one error line that names the flag meant, not usage text."""

    def error(self, message: str):
        unknown = re.findall(r"(--[\w.-]+)", message) if "unrecognized arguments" in message else []
        known = [flag for action in self._actions for flag in action.option_strings]
        close = [match for flag in unknown for match in difflib.get_close_matches(flag, known, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ApostateError(f"{message}{hint}; {self.prog} --help lists every option")
