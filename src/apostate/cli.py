"""`apostate MODEL [flags]`: settings in, exit code out; user errors are one line, never a traceback."""

from __future__ import annotations

import os
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _quiet_libraries()
    from pydantic import ValidationError

    from .errors import ApostateError
    from .progress import console
    from .settings import parse_command_line

    try:
        settings = parse_command_line(argv)
    except ValidationError as error:
        return _fail(console, "invalid settings: " + _validation_summary(error))
    except ApostateError as error:  # a config file that does not parse
        return _fail(console, str(error), error.exit_code)
    except (FileNotFoundError, ValueError) as error:
        return _fail(console, str(error))

    from .pipeline import run

    try:
        return run(settings)
    except ApostateError as error:
        return _fail(console, str(error), error.exit_code)
    except KeyboardInterrupt:
        console.print("\n[yellow]Interrupted.[/] Finished trials are kept in the run folder.")
        return 130


def _fail(console, message: str, code: int = 2) -> int:
    from rich.markup import escape

    # Escaped: messages quote user input and commands such as `pip install 'apostate[demo]'`.
    console.print(f"[red]apostate: error:[/] {escape(message)}", soft_wrap=True)
    return code


def _validation_summary(error) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "settings"
        if item["type"] == "extra_forbidden":
            parts.append(f"{location}: unknown setting (check its spelling; apostate --help lists them all)")
        else:
            parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


def _quiet_libraries() -> None:
    """Keep library chatter (progress bars, advisory warnings) out of the tool's output."""
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Offline, the hub client logs every retry; the one-line error after it says what matters.
    for name in ("bitsandbytes", "huggingface_hub", "httpx", "httpx2", "httpcore"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
