"""logging.wandb_project: rank 0 logs the metrics.jsonl scalars to W&B at the same steps, with the resolved config as
the run config, and a resumed run continues the same W&B run. Runs with WANDB_MODE=offline (no network) and reads
the offline run files (W&B's record log of protobuf Records) back."""

import glob
import json
import os
import struct

import pytest

from loop_harness import run_train
from megafusion.config import load_config

BLOCK = 32768  # W&B's .wandb file: a LevelDB-style log of 32 KiB blocks after a 7-byte ":W&B" header
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path):
    """The protobuf Records of an offline run's run-<id>.wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path}: not a W&B run log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / zero padding
            pos += left
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir):
    """{step: {key: value}} over every offline W&B run under run_dir, and the runs' (id, project, name, config)."""
    history, runs = {}, []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        for record in read_wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                       for item in record.history.item}
                history.setdefault(record.history.step.num, {}).update(
                    {k: v for k, v in row.items() if not k.startswith("_")})
            elif kind == "run":
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
                runs.append((record.run.run_id, record.run.project, record.run.display_name, config))
    return history, runs


def test_wandb_logs_the_metrics_jsonl_scalars_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'megafusion[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "wb"
    common = ["training.train_steps=4", "logging.wandb_project=megafusion-test", "logging.wandb_run_name=tiny-wb",
              "checkpoint.save_at_end=true"]
    run_train(tmp_path, "wb", common + ["training.exit_interval=2"])  # stops at step 2 with a checkpoint
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    run_train(tmp_path, "wb", common)  # resumes at step 2 and finishes

    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [1, 2, 3, 4]
    history, runs = wandb_history(str(run_dir))
    assert sorted(history) == [1, 2, 3, 4]
    for record in jsonl:
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        assert set(scalars) >= {"loss", "loss_ce", "loss_fm", "lr", "grad_norm", "tokens_per_s", "mfu"}
        assert history[record["step"]] == pytest.approx(scalars, rel=1e-12), record["step"]
    assert len(runs) == 2 and {r[0] for r in runs} == {run_id}  # one W&B run, resumed
    _, project, name, config = runs[0]
    assert project == "megafusion-test" and name == "tiny-wb"
    assert config["model"]["hidden_size"] == 64 and config["logging"]["wandb_project"] == "megafusion-test"
    assert config["training"]["run_dir"] == str(run_dir)


def test_wandb_fields_are_validated():
    with pytest.raises(ValueError, match="logging.wandb_project is not"):
        load_config("tiny", ["logging.wandb_run_name=x"])
    with pytest.raises(ValueError, match="logging.wandb_entity"):
        load_config("tiny", ["logging.wandb_entity=team"])
    with pytest.raises(ValueError, match="logging.wandb_project='team/proj' must not contain '/'"):
        load_config("tiny", ["logging.wandb_project=team/proj"])
    cfg = load_config("tiny", ["logging.wandb_project=p", "logging.wandb_entity=team", "logging.wandb_run_name=r"])
    assert (cfg.logging.wandb_project, cfg.logging.wandb_entity, cfg.logging.wandb_run_name) == ("p", "team", "r")
