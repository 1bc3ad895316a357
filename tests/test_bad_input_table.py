"""docs/bad-input.md: at least 30 rows, every area the issue names, each row a test that exists,
and a table that disagrees with its tests is caught."""

from __future__ import annotations

import re

from bad_inputs import AREAS, TABLE, Row, disagreements, read_table


def test_the_table_has_thirty_rows_in_every_area_each_a_test_that_exists():
    rows = read_table()
    assert len(rows) >= 30
    assert {row.area for row in rows.values()} == set(AREAS)
    for row in rows.values():
        path, name = row.test.split("::")
        function = re.sub(r"\[.*\]$", "", name)
        assert f"def {function}(" in (TABLE.parents[1] / path).read_text(), row.test
        warned = row.message.startswith(("apostate: warning:", "Trial "))  # a run that goes on, and says why
        assert row.message and (row.exit != "0" or warned), row


def test_every_signal_in_every_phase_is_a_row():
    listed = {row.what for row in read_table().values() if row.area == "signal"}
    for phase in ("load", "start-up", "trial", "export"):
        assert {f"Ctrl+C during {phase}", f"SIGKILL during {phase}"} <= listed


def test_a_row_the_table_does_not_hold_or_holds_otherwise_is_reported():
    row = Row("settings", "x", "2", "apostate: error: x", "tests/t.py::test_x")
    assert disagreements([row], {}) == ["tests/t.py::test_x (x): not in bad-input.md"]
    changed = Row("settings", "x", "2", "apostate: error: y", "tests/t.py::test_x")
    assert "the test saw" in disagreements([row], {(row.test, row.what): changed})[0]
    assert disagreements([row], {(row.test, row.what): row}) == []
