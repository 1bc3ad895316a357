"""The run report: `<run_dir>/report/index.html` and the PNGs it shows, from the run folder alone.

`build_report(run_dir)` is the one entry point: a finished run calls it, and so does
`apostate report RUN_DIR` (commands/report.py), which loads no model.
"""

from __future__ import annotations

from apostate.report.build import build_report

__all__ = ["build_report"]
