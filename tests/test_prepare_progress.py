"""`prepare`'s progress callback (per shard, counts rising to each split's size) and the `rwray data prepare` bar."""

from __future__ import annotations

from typer.testing import CliRunner

from rwray import cli
from rwray.data import BuilderParams, prepare
from rwray.data.sources import DigitsParams

# Long-tailed digits (exp, IF 10): train per class 108, 84, 65, 50, 39, 30, 23, 18, 14, 10 = 441; val 20 per class;
# the test split is the source's 50 per class. 200 rows per shard -> 3 train shards, 1 val, 3 test.
LT = BuilderParams(imbalance="exp", factor=10, rows_per_shard=200)


def test_prepare_reports_every_shard_with_counts_rising_to_the_split_sizes(tmp_path):
    calls = []
    m = prepare(DigitsParams(), tmp_path / "d", LT, progress=lambda *a: calls.append(a))
    assert calls == [
        ("train", 0, 441), ("train", 200, 441), ("train", 400, 441), ("train", 441, 441),
        ("val", 0, 200), ("val", 200, 200),
        ("test", 0, 500), ("test", 200, 500), ("test", 400, 500), ("test", 500, 500),
    ]
    assert {s: m.num_samples(s) for s in ("train", "val", "test")} == {"train": 441, "val": 200, "test": 500}


def test_prepare_without_a_callback_writes_the_same_shards(tmp_path):
    with_cb = prepare(DigitsParams(), tmp_path / "a", LT, progress=lambda *a: None)
    without = prepare(DigitsParams(), tmp_path / "b", LT)
    assert with_cb.sha256 == without.sha256


def test_the_cli_shows_a_bar_per_split_and_prints_the_summary(tmp_path):
    out = tmp_path / "shards"
    result = CliRunner().invoke(cli.app, ["data", "prepare", "digits", "--out", str(out), "--imbalance", "exp",
                                          "--factor", "10", "--rows-per-shard", "200"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long lines at the terminal's width
    for split, n in (("train", 441), ("val", 200), ("test", 500)):
        assert f"{split} " in text and f"{n}/{n}" in text
    assert f"wrote {out}: {{'train': 441, 'val': 200, 'test': 500}}; " in text
    assert "train per class [108, 84, 65, 50, 39, 30, 23, 18, 14, 10]" in text
    assert (out / "manifest.json").is_file()


def test_a_refused_output_directory_prints_only_the_error(tmp_path):
    out = tmp_path / "shards"
    prepare(DigitsParams(), out, LT)
    result = CliRunner().invoke(cli.app, ["data", "prepare", "digits", "--out", str(out)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert text.startswith("error: DataError ") and "already holds prepared shards" in text
    assert "reading digits" not in text
