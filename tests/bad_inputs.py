"""The bad-input table, docs/bad-input.md: every row is a test, and the table is what those tests saw.

A test of a bad input takes the `bad_input` fixture and hands it what apostate did:
`bad_input.error(area, what, code)` for a command that must fail with one clear line (it checks
the exit code is not 0, that exactly one `apostate: error:` line came out and no traceback;
`bad_input.printed(area, what, code, output)` for one run in a process of its own),
`bad_input.raised(area, what, excinfo)` for an `ApostateError` caught in-process,
`bad_input.signalled(area, what, code, line)` for a signal, and `bad_input.warned(area, what,
code, output, needle)` for a run that goes on (exit 0) after one `apostate: warning:` line. Each records a row: area, input,
exit code, the message (temporary paths as `<tmp>`, local servers' ports as `<port>`), and the test.

At the end of the session the rows recorded are compared with the table: a row that differs,
or a test missing from it, fails the run. `python -m pytest --write-bad-input-table` writes
the table anew from what the tests saw.
"""

from __future__ import annotations

import re
from dataclasses import astuple, dataclass
from pathlib import Path

import pytest

TABLE = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
AREAS = (
    "model source", "settings", "chat template", "prompt source", "start-up", "scoring", "judge", "capabilities", "run folder", "export", "report", "reproduce", "upload",
    "inspect", "workers", "signal", "security",
)  # fmt: skip
HEADER = """# Bad input, faults and signals: what apostate does

Every row is a test (`tests/`), and this table is what those tests saw: the exit code and the
one line apostate printed (temporary paths shown as `<tmp>`). A test run fails when a row here
and its test disagree; `python -m pytest --write-bad-input-table` writes the table anew.
Exit 0: a warning, and the run goes on (what it measures may not be what you meant); 2: a problem you can fix; 130: interrupted (Ctrl+C or SIGTERM); -9: killed (SIGKILL, which
no program can answer; the row gives what the same command says when run again).
Add `--debug` to any command to see the traceback behind its error line.

| area | bad input | exit | what apostate says | test |
| --- | --- | --- | --- | --- |
"""


@dataclass(frozen=True)
class Row:
    area: str
    what: str
    exit: str
    message: str
    test: str

    def markdown(self) -> str:
        cells = (cell.replace("|", "\\|") for cell in astuple(self))
        return "| " + " | ".join(cells) + " |"


class BadInputRecorder:
    """What one test saw, as a row of the table."""

    def __init__(self, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture, basetemp: Path):
        self.request, self.capsys, self.basetemp = request, capsys, basetemp

    def error(self, area: str, what: str, code: int) -> str:
        """The one `apostate: error:` line a failed command printed (checked), recorded."""
        captured = self.capsys.readouterr()
        return self.printed(area, what, code, captured.err + captured.out)

    def printed(self, area: str, what: str, code: int, output: str, vary: str | None = None) -> str:
        """The same, for a command run in a process of its own: `output`, its stdout and stderr.
        `vary`: a pattern for what may differ between runs (a server's words), recorded as `<varies>`."""
        assert code != 0, output
        assert "Traceback" not in output, output
        lines = [line for line in output.splitlines() if line.startswith("apostate: error:")]
        assert len(lines) == 1, output
        self._record(area, what, code, re.sub(vary, "<varies>", lines[0]) if vary else lines[0])
        return lines[0]

    def raised(self, area: str, what: str, excinfo: pytest.ExceptionInfo) -> str:
        """An ApostateError caught in-process: the CLI prints it as one line and exits with its code."""
        from apostate.errors import ApostateError

        message = str(excinfo.value)
        assert isinstance(excinfo.value, ApostateError) and "\n" not in message, message
        self._record(area, what, excinfo.value.exit_code, f"apostate: error: {message}")
        return message

    def warned(self, area: str, what: str, code: int, output: str, needle: str, vary: str | None = None) -> str:
        """The one `apostate: warning:` line holding `needle` in `output` of a run that went on;
        `vary`: a pattern for a measured number that rounding may move on another processor."""
        assert code == 0, output
        assert "Traceback" not in output and "apostate: error:" not in output, output
        lines = [line for line in output.splitlines() if line.startswith("apostate: warning:") and needle in line]
        assert len(lines) == 1, output
        self._record(area, what, code, re.sub(vary, "<varies>", lines[0]) if vary else lines[0])
        return lines[0]

    def found(self, area: str, what: str, line: str) -> str:
        """A line a check printed in-process on a run that goes on (exit 0), e.g. a warning."""
        assert "\n" not in line and line.startswith(("apostate: warning:", "  Trial")), line
        self._record(area, what, 0, line)
        return line

    def signalled(self, area: str, what: str, code: int, line: str) -> None:
        assert code != 0 and "Traceback" not in line
        self._record(area, what, code, line)

    def _record(self, area: str, what: str, code: int, message: str) -> None:
        assert area in AREAS, area
        node = self.request.node
        test = f"{Path(node.path).relative_to(TABLE.parents[1]).as_posix()}::{node.name}"
        message = re.sub(re.escape(str(self.basetemp)) + r"/[^/\s']+", "<tmp>", " ".join(message.split()))
        message = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", message)  # local test servers' free ports
        self.request.config.stash.setdefault(ROWS, []).append(Row(area, what, str(code), message, test))


ROWS = pytest.StashKey[list]()


def read_table(path: Path = TABLE) -> dict[tuple[str, str], Row]:
    """The table's rows by (test, bad input): one test may record several rows."""
    rows = {}
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        if not line.startswith("| ") or line.startswith(("| area", "| ---")):
            continue
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        row = Row(*cells)
        rows[row.test, row.what] = row
    return rows


def write_table(rows: list[Row], path: Path = TABLE) -> None:
    ordered = sorted(rows, key=lambda row: (AREAS.index(row.area), row.test))
    path.parent.mkdir(exist_ok=True)
    path.write_text(HEADER + "".join(row.markdown() + "\n" for row in ordered))


def disagreements(recorded: list[Row], table: dict[tuple[str, str], Row]) -> list[str]:
    """What the tests saw that the table does not say."""
    problems = []
    for row in recorded:
        listed = table.get((row.test, row.what))
        if listed is None:
            problems.append(f"{row.test} ({row.what}): not in {TABLE.name}")
        elif listed != row:
            problems.append(f"{row.test}: the table says {listed.markdown()}, the test saw {row.markdown()}")
    return problems
