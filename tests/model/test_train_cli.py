"""python -m model.train end to end, as a user runs it: a checkpoint and a plot, or exit 2 and a message.
Refusals of the arguments alone, made before anything is read, call its ``main`` in this process (a process
each cost seconds of imports); the rest run it as a process."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.processes import ROOT
from model import load_checkpoint
from model.train import main
from tests.conftest import make_tiny_model
from tests.model.conftest import CsvWriter, seasonal_series

FAST = ["--hidden", "8", "--layers", "1", "--epochs", "3", "--max-seconds", "20"]


def run_cli(*args: str | Path, max_file_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    """``max_file_bytes``: RLIMIT_FSIZE, so a larger write fails with EFBIG as on a full disk (Python
    ignores SIGXFSZ)."""

    def limit() -> None:
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "model.train", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=limit,
    )


def refused_arguments(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[object, str]:
    """The exit status and stderr of ``main`` called with ``args`` that it refuses as it parses them."""
    with pytest.raises(SystemExit) as exited:
        main([*map(str, args)])
    return exited.value.code, capsys.readouterr().err


def test_cli_writes_a_loadable_checkpoint_a_plot_and_the_table(write_csv: CsvWriter, tmp_path: Path) -> None:
    level = seasonal_series(150)
    level[[20, 21, 90]] = np.nan
    path = write_csv(
        name="pump.csv", level=level, flow=seasonal_series(150, seed=1) * 2, note=np.zeros(150)
    )
    text = path.read_text().replace("nan", "")
    path.write_text(text)
    out = tmp_path / "model"
    result = run_cli("--csv", path, "--out", out, "--columns", "level,flow", *FAST)
    assert result.returncode == 0, result.stderr
    assert "column 'level': 3 missing values filled by linear interpolation" in result.stdout
    assert "Validation one-step MAE" in result.stdout and "÷ persistence" in result.stdout
    forecaster, meta = load_checkpoint(out)
    assert forecaster.config.features == ("level", "flow")
    assert meta["name"] == "pump"
    training = meta["training"]
    assert training["rows"] == 150 and training["validation_rows"] == 30
    assert training["filled_missing"] == {"level": 3}
    lags = training["autoregression_lags"]  # per feature, the differences its autoregression weighs
    assert list(lags) == ["level", "flow"] and all(own == sorted(set(own)) for own in lags.values())
    maes = training["validation_mae"]
    assert list(maes)[:2] == ["model", "persistence"]
    assert list(maes)[2].startswith("seasonal naive m=") and list(maes)[3].startswith("AR on diffs lags ")
    assert maes["model"]["level"] < maes["persistence"]["level"]  # a season is easy to beat persistence on
    assert (out / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["version"] == meta["version"]


@pytest.mark.parametrize(
    ("csv_text", "extra", "message"),
    [
        (None, [], "absent.csv: no such file"),
        ("a,b\n" + "1,2\n" * 3, ["--columns", "a,c"], "no column 'c'; the columns are ['a', 'b']"),
        ("a,b\n" + "".join(f"{i},{v},7\n" for i, v in enumerate(np.sin(np.arange(60)))), [],
         "more fields than its header"),  # pandas took the first field for an index, shifting every column
        ("a\n" + "1\n2\nseven\n" * 20, [], "column 'a', row 3: 'seven' is not a number"),
        ("a\n" + "".join(f"{v}\n" for v in [1, 3, 2, 5, 4, 6, 5, 8, 7, 9]), [], "only 10 rows: need at least"),
        ("a,b\n" + "".join(f"{v},4\n" for v in np.sin(np.arange(60))), [], "column 'b' is constant (4)"),
        ("a\n" + "".join(f"{v}e39\n" for v in np.sin(np.arange(60))), [], "beyond float32 range"),
        ("a\n" + "".join(f"{v}e38\n" for v in np.sign(np.sin(np.arange(60))) * 3), [],
         "too large for float32 arithmetic"),
        ("a\n" + "".join(f"{v}e-39\n" for v in np.sin(np.arange(60))), [], "outside float32's range"),
        ("a\n" + "".join(f"{(-1) ** i * 3.3 + v}e38\n" for i, v in enumerate(np.sin(np.arange(60)) / 100)), [],
         "outside float32's range"),
    ],
    ids=["missing-file", "missing-column", "row-longer-than-header", "non-numeric-cell", "too-few-rows",
         "constant-column", "beyond-float32",
         "spread-beyond-float32", "spread-below-float32", "step-spread-beyond-float32"],
)
def test_bad_input_exits_2_with_a_message(
    write_csv: CsvWriter, tmp_path: Path, csv_text: str | None, extra: list[str], message: str
) -> None:
    path = tmp_path / "absent.csv" if csv_text is None else write_csv(csv_text)
    result = run_cli("--csv", path, "--out", tmp_path / "out", *extra, *FAST)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if "float32 arithmetic" not in message:  # the one problem only training finds; the others come before its bar
        assert "val MAE" not in result.stderr  # no progress line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--hidden", "--layers", "--epochs", "--lags", "--season"])
def test_sizes_below_one_exit_2_before_training(write_csv: CsvWriter, tmp_path: Path, flag: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = write_csv(a=seasonal_series(60))
    status, stderr = refused_arguments(capsys, "--csv", path, "--out", tmp_path / "out", *FAST, flag, "0")
    assert status == 2 and f"{flag} must be at least 1, got 0" in stderr


@pytest.mark.parametrize("fraction", ["1.5", "0", "-0.2"])
def test_a_validation_fraction_outside_0_to_1_exits_2_before_any_progress(
    write_csv: CsvWriter, tmp_path: Path, fraction: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(a=seasonal_series(60))
    status, stderr = refused_arguments(capsys, "--csv", path, "--out", tmp_path / "out", *FAST, "--val-fraction",
                                       fraction)
    assert status == 2
    assert f"--val-fraction must lie strictly between 0 and 1, got {float(fraction)}" in stderr
    assert "val MAE" not in stderr  # no progress line


@pytest.mark.parametrize("seconds", ["0", "-1", "nan"])
def test_a_time_limit_that_is_not_positive_exits_2_before_training(
    write_csv: CsvWriter, tmp_path: Path, seconds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--max-seconds nan`` passed the ``<= 0`` check and trained with no time limit at all."""
    path = write_csv(a=seasonal_series(60))
    status, stderr = refused_arguments(capsys, "--csv", path, "--out", tmp_path / "out", *FAST, "--max-seconds",
                                       seconds)
    assert status == 2 and f"--max-seconds must be positive, got {float(seconds)}" in stderr


@pytest.mark.parametrize("rate", ["1", "-0.1", "1.5"])
def test_a_scale_rate_outside_0_to_1_exits_2_before_training(write_csv: CsvWriter, tmp_path: Path, rate: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = write_csv(a=seasonal_series(60))
    status, stderr = refused_arguments(capsys, "--csv", path, "--out", tmp_path / "out", *FAST, "--scale-rate", rate)
    assert status == 2 and f"--scale-rate must lie in [0, 1), got {float(rate)}" in stderr


def test_scores_are_normalised_unless_the_published_model_scores_raw_errors(write_csv: CsvWriter,
                                                                             tmp_path: Path) -> None:
    """By default a checkpoint normalises its scores (β 0.05); --scale-rate 0 keeps raw ones; published next
    to a version calibrated on raw scores, a new version is calibrated alike, so the two share a layout."""
    path = write_csv(a=seasonal_series(120))
    for extra, rate in (((), 0.05), (("--scale-rate", "0"), 0.0), (("--scale-rate", "0.2"), 0.2)):
        out = tmp_path / f"out-{rate}"
        assert run_cli("--csv", path, "--out", out, *FAST, *extra).returncode == 0
        calibration = load_checkpoint(out)[0].calibration
        assert calibration is not None and calibration.scale_rate == rate
    repository = tmp_path / "repo"
    make_tiny_model(repository / "m" / "1", name="m", error_scale=1.0)  # raw scores, as before normalising
    result = run_cli("--csv", path, "--repository", repository, "--name", "m", *FAST,
                     "--hidden", "16", "--layers", "2", "--lags", "4")  # the tiny model's shape
    assert result.returncode == 0 and "m version 1 scores raw errors: calibrating alike" in result.stdout
    raw, newest = load_checkpoint(repository / "m" / "1")[0], load_checkpoint(repository / "m" / "2")[0]
    assert newest.calibration is not None and not newest.calibration.normalised
    assert newest.state_size == raw.state_size


def test_scores_are_raw_when_the_served_version_scores_raw_errors_under_a_damaged_newer_one(
        write_csv: CsvWriter, tmp_path: Path) -> None:
    """Only the newest version on disk was asked: a damaged one there (which the service skips, serving the
    raw one below it) made the new version normalised, whose larger state the service skipped in turn."""
    path, repository = write_csv(a=seasonal_series(120)), tmp_path / "repo"
    make_tiny_model(repository / "m" / "1", name="m", error_scale=1.0)  # raw scores
    (repository / "m" / "2").mkdir()
    (repository / "m" / "2" / "config.json").write_text("{not json")
    result = run_cli("--csv", path, "--repository", repository, "--name", "m", *FAST,
                     "--hidden", "16", "--layers", "2", "--lags", "4")  # the tiny model's shape
    assert result.returncode == 0 and "m version 1 scores raw errors: calibrating alike" in result.stdout
    raw, newest = load_checkpoint(repository / "m" / "1")[0], load_checkpoint(repository / "m" / "3")[0]
    assert newest.state_size == raw.state_size


def test_out_that_is_a_file_is_refused_before_training(write_csv: CsvWriter, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path, out = write_csv(a=seasonal_series(60)), tmp_path / "model"
    out.write_text("not a directory")
    status, stderr = refused_arguments(capsys, "--csv", path, "--out", out, *FAST)
    assert status == 2 and "is a file; give a directory" in stderr
    assert "loss" not in stderr and not out.with_name("validation.png").exists()  # refused before training


def test_more_lags_than_the_rows_fit_exit_2_before_any_progress(write_csv: CsvWriter, tmp_path: Path) -> None:
    """The --lags refusal came from inside training, after the progress bar had shown (README: before)."""
    path = write_csv(a=seasonal_series(100))
    result = run_cli("--csv", path, "--out", tmp_path / "model", *FAST, "--lags", "60")
    assert result.returncode == 2 and "error: --lags 60 needs at least 121 training rows" in result.stderr
    assert "loss" not in result.stderr and not (tmp_path / "model").exists()


@pytest.mark.parametrize("file", ["repo", "repo/m"])
def test_a_repository_or_model_directory_that_is_a_file_is_refused_before_training(
        write_csv: CsvWriter, tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str) -> None:
    """Found only when publishing: after the whole training, as --out's file once was."""
    path, repository = write_csv(a=seasonal_series(60)), tmp_path / "repo"
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text("not a directory")
    status, stderr = refused_arguments(capsys, "--csv", path, "--repository", repository, "--name", "m", *FAST)
    assert status == 2 and f"{tmp_path / file} is a file" in stderr


def test_a_model_name_of_dots_is_refused_before_training(write_csv: CsvWriter, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``--name ..`` published the version into the repository's parent directory."""
    path, repository = write_csv(a=seasonal_series(60)), tmp_path / "repo"
    status, stderr = refused_arguments(capsys, "--csv", path, "--repository", repository, "--name", "..", *FAST)
    assert status == 2 and "--repository needs --name matching" in stderr


def test_weights_that_cannot_be_written_exit_2_and_publish_nothing(write_csv: CsvWriter, tmp_path: Path) -> None:
    """safetensors reports a failed write (a full disk) as SafetensorError, not OSError: the CLI ended with a
    traceback and exit status 1."""
    path, repository = write_csv(a=seasonal_series(60)), tmp_path / "repo"
    result = run_cli("--csv", path, "--repository", repository, "--name", "m", *FAST, max_file_bytes=1024)
    assert result.returncode == 2, result.stderr
    assert f"error: cannot write the checkpoint to {repository}" in result.stderr
    assert "Traceback" not in result.stderr
    assert list((repository / "m").iterdir()) == []  # no version, no staging directory left behind


def test_table_scores_the_validation_tail_and_takes_the_season_from_the_dates(
    write_csv: CsvWriter, tmp_path: Path
) -> None:
    values = seasonal_series(150)
    stamps = pd.date_range("2024-01-01", periods=150, freq="D").strftime("%Y-%m-%d")  # daily: season 7
    rows = (f"{day},{i},{v:.6g}\n" for i, (day, v) in enumerate(zip(stamps, values, strict=True)))
    path = write_csv("date,index,level\n" + "".join(rows))
    result = run_cli("--csv", path, "--out", tmp_path / "out", *FAST)
    assert result.returncode == 0, result.stderr
    assert "column 'index' left out: it says when" in result.stdout
    _, meta = load_checkpoint(tmp_path / "out")
    training = meta["training"]
    assert training["season"] == 7  # daily dates mean a week, not the strongest period found
    truth = np.loadtxt(path, delimiter=",", skiprows=1, usecols=2)
    split = 150 - training["validation_rows"]
    persistence = np.abs(truth[split:] - truth[split - 1 : -1]).mean()
    assert training["validation_mae"]["persistence"]["level"] == pytest.approx(persistence, rel=1e-4)
