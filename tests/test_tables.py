"""Paper tables (jobs/tables/*.yaml): every table and every row validates, each paper row carries the paper's number
(or says why it has none), and each paper row has a digits-scale sibling listed in the table's `*_digits` partner.

Conventions checked here (header comments of the job files; the schema has no field for them):
    # Paper row: ...                   first line of every paper-row job (jobs/paper/, outside jobs/paper/digits/)
    # No reference: <why>              a paper row without `reference` must say why
    # Digits sibling: <path>           paper row -> its digits job, relative to jobs/paper/
    # Shadows: <path>, <path>, ...     digits job -> the paper rows it shadows (one digits job may shadow several
                                       rows that digits cannot tell apart: CIFAR-10 vs CIFAR-100, IF 200 vs 100)
No Ray, no training: loading only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rwray import config as C
from rwray.reproduce import load_table

JOBS = Path(__file__).parent.parent / "jobs"
PAPER = JOBS / "paper"
DIGITS = PAPER / "digits"
TABLE_FILES = sorted((JOBS / "tables").glob("*.yaml"))
RESULTS_TABLES = [t for t in TABLE_FILES if t.stem.startswith("results_")]  # docs/results.md: digits rows only
PAPER_TABLES = [t for t in TABLE_FILES if not t.stem.endswith("_digits") and t not in RESULTS_TABLES]
DIGITS_TABLES = [t for t in TABLE_FILES if t.stem.endswith("_digits") and t not in RESULTS_TABLES]


def _ids(paths):
    return [p.stem for p in paths]


def header(path: Path) -> dict[str, str]:
    """The leading comment block as {key: text} for paragraphs of the form '# Key: text' (continuations '#   ...')."""
    paragraphs: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.startswith("   ") and paragraphs:
            paragraphs[-1] += " " + body.strip()
        else:
            paragraphs.append(body.strip())
    out: dict[str, str] = {}
    for p in paragraphs:
        key, sep, text = p.partition(":")
        if sep:
            out.setdefault(key.strip(), text.strip())
    return out


def rows(table: Path) -> list[Path]:
    raw = yaml.safe_load(table.read_text())
    return [(table.parent / r["job"]).resolve() for r in raw["rows"]]


def partner(table: Path) -> Path:
    return table.with_name(table.stem + "_digits.yaml")


def sibling_of(job: Path) -> Path:
    text = header(job).get("Digits sibling")
    assert text, f"{job.relative_to(JOBS)}: no '# Digits sibling: <path>' header line"
    return (PAPER / text).resolve()


def shadows_of(job: Path) -> list[Path]:
    text = header(job).get("Shadows")
    assert text, f"{job.relative_to(JOBS)}: no '# Shadows: <paths>' header line"
    return [(PAPER / s.strip()).resolve() for s in text.split(",")]


PAPER_ROWS = sorted({j for t in PAPER_TABLES for j in rows(t)})
DIGITS_ROWS = sorted({j for t in DIGITS_TABLES for j in rows(t)})


def _rel(paths):
    return [str(p.relative_to(PAPER)) for p in paths]


def test_tables_exist_in_pairs():
    assert PAPER_TABLES, "no paper tables under jobs/tables/"
    for t in PAPER_TABLES:
        assert partner(t).is_file(), f"{t.name} has no digits-scale partner {partner(t).name}"
    for d in DIGITS_TABLES:
        assert d.with_name(d.stem.removesuffix("_digits") + ".yaml").is_file(), f"{d.name} shadows no paper table"


@pytest.mark.parametrize("table", TABLE_FILES, ids=_ids(TABLE_FILES))
def test_every_table_and_row_validates(table):
    tj = load_table(table)  # raises ConfigError listing every bad row
    assert tj.table.seeds == [0, 1, 2]
    assert len(tj.jobs) == len(tj.table.rows) >= 1
    for _, cfg in tj.jobs:
        assert cfg.tracking.experiment == tj.table.name  # the table's experiment wins over the job's own


@pytest.mark.parametrize("table", RESULTS_TABLES, ids=_ids(RESULTS_TABLES))
def test_results_tables_reuse_digits_rows(table):
    """The tables behind docs/results.md run here in minutes: each row is a digits sibling some digits table lists,
    or (a comparison no paper table holds, e.g. GroupDRO / JTT) a job on digits-scale data."""
    strays = [j for j in rows(table) if j not in DIGITS_ROWS
              and C.load(j).data.source.name not in ("digits", "biased-digits")]
    assert not strays, f"{table.name}: rows that are neither a digits table's row nor on digits data: {strays}"


def test_table_names_unique():
    names = [yaml.safe_load(t.read_text())["name"] for t in TABLE_FILES]
    assert len(names) == len(set(names)), names


def test_every_job_under_paper_is_a_table_row():
    listed = set(PAPER_ROWS) | set(DIGITS_ROWS)
    orphans = [p for p in sorted(PAPER.rglob("*.yaml")) if p.resolve() not in listed]
    assert not orphans, f"jobs in no table: {_rel(orphans)}"
    misplaced = [p for p in PAPER_ROWS if DIGITS in p.parents] + [p for p in DIGITS_ROWS if DIGITS not in p.parents]
    assert not misplaced, f"paper tables must list jobs/paper/*, digits tables jobs/paper/digits/*: {_rel(misplaced)}"


@pytest.mark.parametrize("job", PAPER_ROWS, ids=_rel(PAPER_ROWS))
def test_paper_row_has_reference_or_says_why_not(job):
    cfg = C.load(job)
    h = header(job)
    assert "Paper row" in h, f"{job.name}: first comment should name the paper row ('# Paper row: ...')"
    if cfg.reference is None:
        assert len(h.get("No reference", "")) > 20, f"{job.name}: no reference and no '# No reference: <why>' line"
    else:
        ref = cfg.reference
        assert "No reference" not in h, f"{job.name}: has a reference and a '# No reference' line"
        assert 0 < ref.value <= 100
        # Say where the number is from: the paper's table or a repository README.
        assert "README" in ref.source or "Table" in ref.source, ref.source


@pytest.mark.parametrize("job", PAPER_ROWS, ids=_rel(PAPER_ROWS))
def test_paper_row_has_digits_sibling_in_partner_table(job):
    sib = sibling_of(job)
    assert sib.is_file(), f"{job.name}: digits sibling {sib} does not exist"
    assert DIGITS in sib.parents
    tables = [t for t in PAPER_TABLES if job in rows(t)]
    for t in tables:
        assert sib in rows(partner(t)), f"{job.name}: sibling {sib.name} is not a row of {partner(t).name}"
    assert job in shadows_of(sib), f"{sib.name} does not list {job.name} in its '# Shadows:' line"


@pytest.mark.parametrize("job", DIGITS_ROWS, ids=_rel(DIGITS_ROWS))
def test_digits_row_is_a_quick_shadow(job):
    cfg = C.load(job)
    assert cfg.reference is None, f"{job.name}: digits siblings are not the paper's setting: no reference"
    assert cfg.data.source is not None and cfg.data.source.name in ("digits", "biased-digits")
    assert cfg.scaling.num_workers == 1 and not cfg.scaling.use_gpu and cfg.train.epochs <= 20
    shadowed = shadows_of(job)
    for paper_job in shadowed:
        assert paper_job in PAPER_ROWS, f"{job.name} shadows {paper_job}, which is no paper table's row"
        assert sibling_of(paper_job) == job, f"{paper_job.name} names another sibling than {job.name}"
    for t in DIGITS_TABLES:
        if job in rows(t):
            paper_table = t.with_name(t.stem.removesuffix("_digits") + ".yaml")
            assert any(p in rows(paper_table) for p in shadowed), f"{job.name} shadows no row of {paper_table.name}"


def test_jobs_sharing_a_data_dir_build_the_same_data():
    """Shards are built only when data.dir holds none yet: two jobs with one dir but different sources or builders
    would silently train on whichever was prepared first."""
    by_dir: dict[str, tuple[str, dict, Path]] = {}
    clashes = []
    for path in sorted(JOBS.rglob("*.yaml")):
        if "tables" in path.relative_to(JOBS).parts:
            continue
        cfg = C.load(path)
        if cfg.data.source is None:
            continue
        spec = (cfg.data.source.model_dump_json(), cfg.data.builder.model_dump())
        seen = by_dir.setdefault(str(cfg.data.dir), (*spec, path))
        if seen[:2] != spec:
            clashes.append(f"{path.relative_to(JOBS)} vs {seen[2].relative_to(JOBS)} ({cfg.data.dir})")
    assert not clashes, "same data.dir, different data:\n" + "\n".join(clashes)
