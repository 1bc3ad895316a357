"""`apostate MODEL [flags]` and `apostate COMMAND ...`: arguments in, exit code out; user errors
are one line, never a traceback."""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from importlib import import_module

from apostate.errors import first_line

# `apostate COMMAND ARGS`: the module whose main(args) -> exit code does it. A model folder
# that has one of these names is given as ./NAME.
COMMANDS = {
    "report": "apostate.commands.report",
    "reproduce": "apostate.commands.reproduce",
    "inspect": "apostate.commands.inspect",
}

INTERRUPTED = (
    "Interrupted. Finished trials are kept in the study (run folder or --storage), and an earlier export is unchanged; "
    "run the same command again to resume."
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = _debug_asked(argv)
    _quiet_libraries()
    if argv and argv[0] in COMMANDS:
        command = import_module(COMMANDS[argv[0]])
        args = [arg for arg in argv[1:] if arg not in ("--debug", "--debug=true", "--debug=True")]
        return _guarded(lambda: command.main(args), debug)
    from pydantic import ValidationError

    from apostate.errors import ApostateError
    from apostate.progress import console

    try:
        from apostate.settings import parse_command_line

        settings = parse_command_line(argv)
    except ValidationError as error:
        return _fail(console, "invalid settings: " + _validation_summary(error), debug=debug)
    except ApostateError as error:  # a config file that does not parse
        return _fail(console, str(error), error.exit_code, debug=debug)
    except (FileNotFoundError, ValueError) as error:
        return _fail(console, str(error), debug=debug)

    from apostate.commands.run import run

    debug = debug or settings.debug  # `debug = true` in a config file
    return _guarded(lambda: run(settings), debug)


def _guarded(work, debug: bool) -> int:
    """Run `work` (returns an exit code): a user error is one line, Ctrl+C or SIGTERM keeps what is
    finished, a bug is one line asking for --debug."""
    from pydantic import ValidationError

    from apostate.errors import ApostateError
    from apostate.progress import console

    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous_handler = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None  # `kill PID` = Ctrl+C
    try:
        return work()
    except ValidationError as error:  # a command's settings
        return _fail(console, "invalid settings: " + _validation_summary(error), debug=debug)
    except ApostateError as error:
        return _fail(console, str(error), error.exit_code, debug=debug)
    except KeyboardInterrupt:
        if debug:
            console.print_exception()
        console.print(f"\n[yellow]{INTERRUPTED}[/]")
        return 130
    except Exception as error:  # a bug: one line with what to do, the traceback only with --debug
        if debug:
            raise
        message = f"internal error: {type(error).__name__}: {first_line(error)} (run again with --debug for the traceback, and please report it)"
        return _fail(console, message, 1)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _debug_asked(argv: list[str]) -> bool:
    """--debug (or APOSTATE_DEBUG) read before the settings parse, so that their errors can show a
    traceback too; `debug` in a config file counts once the settings are read."""
    flag = any(arg in ("--debug", "--debug=true", "--debug=True") for arg in argv)
    return flag or os.environ.get("APOSTATE_DEBUG", "").lower() in ("1", "true")


def _fail(console, message: str, code: int = 2, debug: bool = False) -> int:
    from rich.markup import escape

    if debug and sys.exc_info()[0] is not None:
        console.print_exception()
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
