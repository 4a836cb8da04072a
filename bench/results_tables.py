"""Regenerate the table-driven sections of docs/results.md: `rwray reproduce` then `rwray report --into` for each
results table (jobs/tables/results_*.yaml), recorded in one MLflow store under bench/out/results/ (git-ignored).

    .venv/bin/python bench/results_tables.py                       # every results table: run, then report
    .venv/bin/python bench/results_tables.py results_rebias_biased_digits --report-only

Each table's section sits between <!-- report:NAME:begin/end --> markers; the prose around them is written by hand
from what the tables show.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = sorted((ROOT / "jobs" / "tables").glob("results_*.yaml"))
DOC = ROOT / "docs" / "results.md"


def main(argv: list[str]) -> int:
    from rwray.report import report
    from rwray.reproduce import reproduce

    ap = argparse.ArgumentParser()
    ap.add_argument("tables", nargs="*", help="table stems (default: every jobs/tables/results_*.yaml)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the sections from the recorded runs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "results")
    args = ap.parse_args(argv)
    tables = [t for t in TABLES if not args.tables or t.stem in args.tables]
    overrides = [f"output_dir={args.out.resolve()}"]
    for t in tables:
        parent = None if args.report_only else reproduce(t, overrides)
        print(report(t, parent_run_id=parent, overrides=overrides, into=DOC))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
