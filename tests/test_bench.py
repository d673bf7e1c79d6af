"""``make bench``'s GRU table runs, and exits 0 only while our outputs match nn.GRU's (it never judges a time)."""

from __future__ import annotations

import pytest
import torch

from bench import __main__ as bench_main
from bench import cell


def test_cell_table_runs_and_checks_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--shapes", "4,16,1", "2,8,3", "--batches", "1", "5", "--steps", "3", "--rounds", "1",
            "--min-run-time", "0.001", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert cell.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # main sets the service's count for the whole process
    printed = capsys.readouterr().out
    assert "outputs: all within 1e-05" in printed
    assert printed.count("slower than nn.GRU at") == 3 and "/4 shapes" in printed


def test_gpu_timings_wait_for_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock that did not wait timed how fast the host queued kernels (every GPU table before 3ff8c89)."""
    waits: list[None] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: waits.append(None))
    cell.clock_for("wall", "cuda")()
    assert len(waits) == 1
    cell.clock_for("wall", "cpu")()
    cell.clock_for("cpu", "cpu")()
    assert len(waits) == 1


def test_bench_entry_point_answers_help_and_refuses_unknown_flags_before_running_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv, status in ((["--help"], 0), (["--bogus"], 2)):
        with pytest.raises(SystemExit) as stopped:
            bench_main.main(argv)
        assert stopped.value.code == status
    assert "--load" in capsys.readouterr().out
