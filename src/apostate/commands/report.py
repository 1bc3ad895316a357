"""`apostate report RUN_DIR`: rebuild a run's report from its folder, without loading the model."""

from __future__ import annotations

from pathlib import Path

from apostate.config_sources import OneLineArgumentParser
from apostate.progress import console
from apostate.report.build import build_report
from apostate.search.reading import load_run_study


def main(argv: list[str]) -> int:
    parser = OneLineArgumentParser(
        prog="apostate report",
        description="Rebuild the HTML report (and its PNGs) of a run from its run folder; no model is loaded.",
    )
    parser.add_argument("run_dir", type=Path, help="the run folder (it holds study.journal, or storage.json)")
    parser.add_argument(
        "--storage",
        help="the database of a shared study, if not the one storage.json names (the password may come from "
        "PGPASSWORD or ~/.pgpass instead)",
    )
    parser.add_argument("--study-name", help="the shared study's name, if not the one storage.json names")
    args = parser.parse_args(argv)
    study = load_run_study(args.run_dir, args.storage, args.study_name) if args.storage or args.study_name else None
    path = build_report(args.run_dir, study)
    console.print(f"Report written to [bold]{path}[/]")
    return 0
