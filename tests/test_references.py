"""docs/references.md is the register of every published number the jobs reproduce: each `reference` (and each
`reference.also` column) of a job appears there with the same value and an upstream source, every register row points
at a job that still carries it, and every paper-style job is listed (with its number, or as not published). Loading
only: no Ray, no training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rwray import config as C

ROOT = Path(__file__).parent.parent
REGISTER = ROOT / "docs" / "references.md"
JOBS = ROOT / "jobs"
STATUSES = ("verified: file", "verified: README", "not published")
ROW = re.compile(r"^\| `(?P<job>jobs/[^`]+\.yaml)` \| (?P<metric>[^|]+?) \| (?P<value>[^|]+?) \| (?P<source>[^|]*?) "
                 r"\| (?P<status>[^|]+?) \| (?P<dev>[^|]*?) \|$")


def register_rows() -> list[dict[str, str]]:
    rows = [m.groupdict() for line in REGISTER.read_text().splitlines() if (m := ROW.match(line))]
    assert rows, "no register rows parsed from docs/references.md"
    return rows


def paper_jobs() -> list[Path]:
    """The jobs that stand for a published row or recipe: jobs/paper/ outside its digits siblings, and jobs/large/."""
    paper = [p for p in (JOBS / "paper").rglob("*.yaml") if "digits" not in p.relative_to(JOBS / "paper").parts]
    return sorted(paper + list((JOBS / "large").glob("*.yaml")))


def published(cfg: C.Config) -> dict[str, float]:
    """metric -> value of every number the job claims: its reference and the reference's other columns."""
    if cfg.reference is None:
        return {}
    return {cfg.reference.metric: cfg.reference.value, **cfg.reference.also}


def test_every_register_row_is_well_formed():
    for r in register_rows():
        assert r["status"] in STATUSES, r
        assert len(r["source"]) > 10, f"{r['job']}: the register must name where the number is read"
        if r["status"] == "not published":
            assert r["value"] == "-" and r["metric"] == "-", r
        else:
            float(r["value"])
            # a line, a table row or a cell: where in the upstream file the number stands
            assert re.search(r":\d+|line|cell|row", r["source"]), f"{r['job']}: source without a line: {r['source']}"


@pytest.mark.parametrize("job", paper_jobs(), ids=lambda p: str(p.relative_to(JOBS)))
def test_every_reference_is_registered_with_the_same_value(job):
    cfg = C.load(job)
    rel = str(job.relative_to(ROOT))
    mine = [r for r in register_rows() if r["job"] == rel]
    assert mine, f"{rel} is not in docs/references.md (list it, as `not published` if it has no number)"
    claims = published(cfg)
    if not claims:
        assert all(r["status"] == "not published" for r in mine), f"{rel}: no reference in the job, a number in the register"
        return
    registered = {r["metric"]: float(r["value"]) for r in mine if r["status"] != "not published"}
    assert registered == claims, f"{rel}: job says {claims}, register says {registered}"


def test_every_register_row_points_at_an_existing_job():
    for r in register_rows():
        assert (ROOT / r["job"]).is_file(), f"register row for a job that does not exist: {r['job']}"


def test_jobs_cite_the_register_and_no_path_outside_the_repository():
    """Job headers used to point at notes of the build machine; what they cite must ship with the repository."""
    for path in sorted(JOBS.rglob("*")):
        if path.is_file():
            text = path.read_text()
            assert "notes/" not in text and "/work/" not in text, f"{path.relative_to(ROOT)} cites a path outside the repo"


def test_report_shows_the_papers_other_columns_beside_ours():
    from rwray.report import _paper
    from rwray.reproduce import Column

    cfg = C.load(JOBS / "paper" / "rebias" / "imagenet9_rebias.yaml")
    assert _paper(cfg, Column(metric="imagenet_a/top1")) == " (paper 29.6)"
    assert _paper(cfg, Column(metric="test/cluster_unbiased_acc")) == " (paper 90.5)"
    assert _paper(cfg, Column(metric="test/cluster_unbiased_acc", at="last")) == ""  # the paper's are selected numbers
    assert _paper(cfg, Column(metric="test/balanced_acc")) == ""
