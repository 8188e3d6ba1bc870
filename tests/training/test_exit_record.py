"""<run_dir>/last_exit.json and the verdict a launcher acts on (requeue / done / stop / failed)."""

import json

import pytest

from megafusion.training.exit_record import FILENAME, LAUNCH_ID_ENV, main, read_exit_record, verdict, write_exit_record


def _record(tmp_path, monkeypatch, launch_id="job.0", **kwargs):
    monkeypatch.setenv(LAUNCH_ID_ENV, launch_id)
    fields = dict(reason="signal", step=7, start_step=3, total_steps=20, checkpoint_step=7, signal_number=10)
    fields.update(kwargs)
    write_exit_record(str(tmp_path), **fields)
    return read_exit_record(str(tmp_path))


@pytest.mark.parametrize("fields, expected", [
    (dict(), "requeue"),                                                      # SIGUSR1, saved, progress
    (dict(reason="exit_duration", signal_number=None), "requeue"),
    (dict(signal_number=15), "stop"),                                         # SIGTERM: a cancellation
    (dict(reason="exit_interval", signal_number=None), "stop"),
    (dict(reason="finished", step=20, checkpoint_step=20, signal_number=None), "done"),
    (dict(step=3, checkpoint_step=3), "failed"),                              # no step since the start: would loop
    (dict(checkpoint_step=5), "failed"),                                      # this step not saved
])
def test_verdicts(tmp_path, monkeypatch, fields, expected):
    record = _record(tmp_path, monkeypatch, **fields)
    assert verdict(record, "job.0")[0] == expected


def test_a_record_from_another_launch_or_none_is_a_failure(tmp_path, monkeypatch):
    record = _record(tmp_path, monkeypatch, launch_id="job.0")
    assert verdict(record, "job.1")[0] == "failed"
    assert verdict(None, "job.1")[0] == "failed"


def test_cli_prints_the_verdict(tmp_path, monkeypatch, capsys):
    record = _record(tmp_path, monkeypatch)
    assert record["signal"] == "SIGUSR1" and record["saved"] and json.loads((tmp_path / FILENAME).read_text())
    assert main(["--run-dir", str(tmp_path), "--launch-id", "job.0"]) == 0
    assert capsys.readouterr().out.startswith("requeue SIGUSR1: saved step 7")
    assert main(["--run-dir", str(tmp_path / "none"), "--launch-id", "job.0"]) == 1
    assert capsys.readouterr().out.startswith("failed ")
