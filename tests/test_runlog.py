"""The training log (runlog.py): a resumed run drops the rows logged after its checkpoint, so each iteration
is logged once, as in an uninterrupted run; the cut-back is atomic and leaves no temporary file."""
import os

import pytest

import files
import runlog
import train
from test_train import tiny_cfg

HEADER = ",".join(runlog.COLUMNS) + "\n"


def write_rows(path, iterations, tail=""):
    """A log with one row per iteration, as csv.writer writes them (\r\n line ends), then `tail`."""
    path.write_text(HEADER)
    for it in iterations:
        runlog.append_row(path, [it, 0.01, 1.5, 0.5, 0.25, 0.125, 1.0, float("nan"), 2.0 * it])
    with open(path, "a", newline="") as f:
        f.write(tail)


def test_a_new_log_is_the_header_alone(tmp_path):
    path = tmp_path / "log.csv"
    write_rows(path, [1, 2, 3])
    runlog.start_log(path)                                           # a new run replaces an old log
    assert path.read_text() == HEADER
    missing = tmp_path / "missing.csv"
    runlog.start_log(missing, resume_at=4)                           # resuming without a log starts one
    assert missing.read_text() == HEADER


def test_resuming_drops_the_rows_after_the_checkpoint(tmp_path):
    path, expected = tmp_path / "log.csv", tmp_path / "expected.csv"
    write_rows(expected, [2, 4, 6])
    write_rows(path, [2, 4, 6, 8, 10], tail="12,0.0")               # killed while writing the row of 12
    runlog.start_log(path, resume_at=6)
    assert path.read_bytes() == expected.read_bytes()
    assert [r["iter"] for r in runlog.read_log(path)] == ["2", "4", "6"]
    runlog.start_log(path, resume_at=6)                              # nothing to drop: left as it is
    assert path.read_bytes() == expected.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected.csv", "log.csv"]


def test_the_cut_back_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    write_rows(path, [1, 2, 3, 4])
    before = path.read_bytes()
    path.chmod(0o644)

    def crash(src, dst):
        assert os.path.dirname(src) == str(tmp_path) and os.path.getsize(src) < len(before)
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(files.WriteError, match="log.csv"):
        runlog.start_log(path, resume_at=2)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["log.csv"]
    monkeypatch.undo()
    runlog.start_log(path, resume_at=2)
    assert [r["iter"] for r in runlog.read_log(path)] == ["1", "2"]
    assert path.stat().st_mode & 0o777 == 0o644 and [p.name for p in tmp_path.iterdir()] == ["log.csv"]


def test_a_killed_and_resumed_run_logs_what_an_uninterrupted_one_does(tiny_la, tmp_path, monkeypatch):
    """Checkpoints every 2 iterations, a row every one: killed during iteration 4, the run has logged 3 rows
    and checkpointed at 2; resumed, it logs iterations 3 to 5 again, and its log is the uninterrupted run's
    (the seconds aside)."""
    train.train(tiny_cfg(tiny_la, tmp_path / "full", max_iters=5), progress=False)
    step = train.train_step

    def killed(run, it, *batch):
        if it == 3:
            raise KeyboardInterrupt
        return step(run, it, *batch)

    cfg = tiny_cfg(tiny_la, tmp_path / "killed", max_iters=5)
    monkeypatch.setattr(train, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, progress=False)
    assert [r["iter"] for r in runlog.read_log(tmp_path / "killed" / "log.csv")] == ["1", "2", "3"]
    monkeypatch.undo()
    train.train(cfg, resume=True, progress=False)
    timeless = lambda run: [{k: v for k, v in r.items() if k != "seconds"}
                            for r in runlog.read_log(tmp_path / run / "log.csv")]
    rows = timeless("killed")
    assert [r["iter"] for r in rows] == ["1", "2", "3", "4", "5"] and rows == timeless("full")
