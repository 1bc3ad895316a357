"""The one exception type the command line turns into a single error line."""


class ApostateError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported model).

    The CLI prints `apostate: error: <message>` and exits with `exit_code`; no traceback.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name where it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
