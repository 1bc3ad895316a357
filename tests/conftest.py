import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", message=".*kernels.*")

import bad_inputs  # noqa: E402  (needs the path above)
from postgres_server import postgres_server, postgres_url  # noqa: E402,F401  (fixtures)


def pytest_addoption(parser):
    parser.addoption(
        "--write-bad-input-table",
        action="store_true",
        help="write docs/bad-input.md from what the bad-input tests saw (run the whole suite)",
    )


@pytest.fixture(autouse=True, scope="session")
def no_benchmarks():
    """Runs score no capability benchmarks unless a test asks (the real task data is a separate,
    large package; tests/capabilities brings a few local items). Session-wide, so that module
    fixtures that run apostate see it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APOSTATE_CAPABILITIES__TASKS", "[]")
        yield


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random chat model saved as a model folder (read-only for the tests)."""
    from tiny import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "tiny-qwen")


@pytest.fixture
def bad_input(request, capsys, tmp_path_factory):
    """Records what a bad input made apostate do, as a row of docs/bad-input.md."""
    return bad_inputs.BadInputRecorder(request, capsys, tmp_path_factory.getbasetemp())


def pytest_sessionfinish(session, exitstatus):
    recorded = session.config.stash.get(bad_inputs.ROWS, [])
    if session.config.getoption("--write-bad-input-table"):
        bad_inputs.write_table(
            list({**bad_inputs.read_table(), **{(row.test, row.what): row for row in recorded}}.values())
        )
        return
    problems = bad_inputs.disagreements(recorded, bad_inputs.read_table())
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_sep("=", f"{bad_inputs.TABLE.name} disagrees with the tests", red=True)
        for problem in problems:
            reporter.write_line(problem)
        reporter.write_line("run `python -m pytest --write-bad-input-table` and review the diff")
        session.exitstatus = 1
