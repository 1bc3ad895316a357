"""`apostate report RUN_DIR`: rebuild a run's report from its folder, without loading the model."""

from __future__ import annotations

from pathlib import Path

from ..progress import console
from ..settings import OneLineArgumentParser
from .build import build_report


def main(argv: list[str]) -> int:
    parser = OneLineArgumentParser(
        prog="apostate report",
        description="Rebuild the HTML report (and its PNGs) of a run from its run folder; no model is loaded.",
    )
    parser.add_argument("run_dir", type=Path, help="the run folder (it holds study.journal)")
    args = parser.parse_args(argv)
    path = build_report(args.run_dir)
    console.print(f"Report written to [bold]{path}[/]")
    return 0
