"""Run every benchmark (each in a fresh process) and assemble docs/benchmarks.md from their sections.

    .venv/bin/python bench/run_all.py              # all
    .venv/bin/python bench/run_all.py backbone     # only bench/bench_backbone.py, then reassemble
    .venv/bin/python bench/run_all.py --assemble   # only reassemble docs/benchmarks.md from the sections

Each bench/bench_<topic>.py measures its pairs side by side in one run and writes docs/benchmarks-<topic>.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def main(selected: list[str]) -> int:
    scripts = sorted((ROOT / "bench").glob("bench_*.py"))
    if selected == ["--assemble"]:
        scripts = []
    elif selected:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in selected]
    for s in scripts:
        print(f"== {s.name}", flush=True)
        if subprocess.run([sys.executable, str(s)], cwd=ROOT).returncode != 0:
            print(f"{s.name} failed", file=sys.stderr)
            return 1
    sections = [p.read_text().strip() for p in sorted(DOCS.glob("benchmarks-*.md"))]
    header = ("# Benchmarks\n\nEvery ratio below was measured side by side in one run of its script (this machine is "
              "noisy: absolute times from different runs are not comparable). Regenerate all with "
              "`.venv/bin/python bench/run_all.py`.\n")
    (DOCS / "benchmarks.md").write_text("\n\n".join([header, *sections]) + "\n")
    print((DOCS / "benchmarks.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
