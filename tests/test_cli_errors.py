"""Every rwray error reaches a CLI user as its message and a non-zero exit code, never a traceback; anything else
is a bug and keeps its traceback."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from conftest import job
from rwray import cli, errors
from rwray.train.identity import RunLock

EXAMPLES = {  # one instance of every user-facing error, as the code raises it
    errors.ConfigError: errors.ConfigError(["optim.lr: must be > 0"], "job.yaml"),
    errors.PathError: errors.PathError("resume=/etc is outside /runs"),
    errors.UnknownName: errors.UnknownName("unknown model 'resnet9'; choose one of: resnet18, resnet32"),
    errors.DataError: errors.DataError("shard directory d has no manifest.json"),
    errors.SourceError: errors.SourceError("no model at models:/nope/1 in sqlite:///runs/mlflow.db"),
    errors.TrackingError: errors.TrackingError("cannot reach the MLflow tracking server at http://127.0.0.1:9"),
    errors.RunInUse: errors.RunInUse("run 'x' is being trained by another process (pid 7)"),
    errors.CheckpointError: errors.CheckpointError("ckpt/state.pt", "it is not a readable torch file"),
    errors.NotACheckpoint: errors.NotACheckpoint("ckpt is not an rwray checkpoint (no state.pt)"),
    errors.NonFiniteLoss: errors.NonFiniteLoss(2, 5, [11, 12]),
    errors.BatchTooLarge: errors.BatchTooLarge("data.batch_size", 512, "at epoch 0, step 3"),
    errors.CompileUnavailable: errors.CompileUnavailable("train.compile: torch.compile with backend 'inductor' cannot "
                                                         "run on this worker (cpu). Set train.compile=false"),
    errors.ClusterUnreachable: errors.ClusterUnreachable("cannot reach the Ray cluster at RAY_ADDRESS=10.0.0.9:6379"),
    errors.ResourceError: errors.ResourceError("cannot start: the run asks for 2 workers x {CPU: 1, GPU: 1}, and "
                                               "the cluster's nodes hold none of them."),
    errors.OutOfMemory: errors.OutOfMemory("train worker rank 0 (pid 7, node 10.0.0.2)", "the process used 19.5 GiB",
                                           "in epoch 1 of 1, evaluating split test", "lower data.eval_batch_size"),
    errors.RehearsalFailed: errors.RehearsalFailed("`rwray train job.yaml` exited with 2 after 9 s; its log is "
                                                   "train.log"),
}


def all_subclasses(cls: type) -> set[type]:
    return {c for s in cls.__subclasses__() for c in (s, *all_subclasses(s))}


def test_every_error_class_has_an_example():
    assert all_subclasses(errors.RwrayError) == set(EXAMPLES)


@pytest.mark.parametrize("cls", sorted(EXAMPLES, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_the_cli_prints_the_message_and_exits_with_the_errors_code(cls, capsys):
    err = EXAMPLES[cls]
    with pytest.raises(typer.Exit) as e:
        with cli.friendly_errors():
            raise err
    assert e.value.exit_code == err.exit_code != 0
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback
    printed = " ".join(capsys.readouterr().err.split())  # rich wraps long lines at the terminal's width
    assert printed == f"error: {cls.__name__} {' '.join(str(err).split())}"


def test_run_failures_exit_1_and_bad_input_exits_2():
    assert {c.__name__ for c, e in EXAMPLES.items() if e.exit_code == 1} == {"NonFiniteLoss", "BatchTooLarge",
                                                                               "OutOfMemory", "RehearsalFailed"}


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        with cli.friendly_errors():
            1 / 0


def test_a_run_in_use_through_the_real_command(tmp_path, digits_dir, write_job):
    """`rwray train` while another driver holds the run: one message, exit 2, before Ray or MLflow run is made."""
    cfg = job(tmp_path, digits_dir)
    path = write_job(cfg.model_dump(mode="json"))
    with RunLock(cfg):
        result = CliRunner().invoke(cli.app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    assert "RunInUse" in result.output and "being trained by another process" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
