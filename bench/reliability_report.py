"""Regenerate docs/reliability.md (and docs/reliability/*.json): run the fault, bad-input and security tests with
their recorder pointed at the committed store, then render the report.

    .venv/bin/python bench/reliability_report.py            # all four modules (real Ray runs: ~10 minutes)
    .venv/bin/python bench/reliability_report.py -k store   # extra pytest arguments pass through

A plain `pytest` run records into a temporary folder instead, so running the tests never changes tracked files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["tests/test_faults.py", "tests/test_oom.py", "tests/test_bad_input_table.py", "tests/test_security.py"]


def main(args: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from reliability_report import COMMITTED, ENV, render

    env = {**os.environ, ENV: str(COMMITTED)}
    code = subprocess.run([sys.executable, "-m", "pytest", "-q", *MODULES, *args], cwd=ROOT, env=env).returncode
    render(COMMITTED)
    print(f"wrote {COMMITTED.parent / 'reliability.md'} (pytest exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
