"""Parallel workers and resume: 1 vs 2 workers byte-identical; kill -9 mid-run then re-run == uninterrupted run;
a finished folder is left alone; shards of a different command are refused."""

import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megafusion.preprocess import PreprocessError, PreprocessOptions, run_preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA_FILES = ("tokens.bin", "tokens.idx", "latents.bin", "latents.idx", "rejects.jsonl")


def _same_dataset(a, b):
    for name in DATA_FILES:
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
    ma, mb = (json.load(open(os.path.join(d, "manifest.json"))) for d in (a, b))
    ma.pop("command"), mb.pop("command")
    assert ma == mb


@pytest.fixture()
def inputs(tmp_path):
    from preprocess_corpus import mixed_rows, write_jsonl_with_paths, write_parquet

    rows = mixed_rows(24, seed=11)
    rows[5]["image"] = b"broken"  # one reject, so rejects.jsonl is compared too
    return [write_parquet(str(tmp_path / "m.parquet"), rows, row_group_size=7),
            write_jsonl_with_paths(str(tmp_path / "j"), 9)]


def _opts(inputs, out, tokenizer, **kw):
    base = dict(inputs=inputs, output=str(out), tokenizer=tokenizer, encoder_config={"resolution": 8},
                min_image_size=8, seq_length=64, records_per_shard=6, chunk_records=4, max_reject_fraction=0.2,
                progress=False)
    base.update(kw)
    return PreprocessOptions(**base)


def test_one_and_two_workers_are_byte_identical(tmp_path, inputs, tokenizer_path):
    one = run_preprocess(_opts(inputs, tmp_path / "w1", tokenizer_path, workers=1))
    two = run_preprocess(_opts(inputs, tmp_path / "w2", tokenizer_path, workers=2))
    assert one["counts"]["rejected"] == 1 and one["counts"]["documents"] == 32
    _same_dataset(tmp_path / "w1", tmp_path / "w2")
    assert one == two  # same command string too (the Python API default)


def test_finished_folder_is_kept_and_other_commands_refused(tmp_path, inputs, tokenizer_path, capsys):
    out = tmp_path / "out"
    run_preprocess(_opts(inputs, out, tokenizer_path))
    before = os.stat(out / "tokens.bin").st_mtime_ns
    run_preprocess(_opts(inputs, out, tokenizer_path, workers=2))
    assert "already complete" in capsys.readouterr().err
    assert os.stat(out / "tokens.bin").st_mtime_ns == before
    with pytest.raises(PreprocessError, match="--overwrite"):
        run_preprocess(_opts(inputs, out, tokenizer_path, seq_length=128))
    manifest = run_preprocess(_opts(inputs, out, tokenizer_path, seq_length=128, overwrite=True))
    assert manifest["options"]["seq_length"] == 128


def test_damaged_shard_is_rewritten(tmp_path, inputs, tokenizer_path, capsys):
    out = tmp_path / "out"
    run_preprocess(_opts(inputs, out, tokenizer_path, keep_shards=True))
    run_preprocess(_opts(inputs, tmp_path / "reference", tokenizer_path))
    os.remove(out / "manifest.json")
    with open(out / "shards" / "shard-00002.latents.bin", "r+b") as f:
        f.truncate(10)  # its done-marker no longer matches the file size
    capsys.readouterr()
    run_preprocess(_opts(inputs, out, tokenizer_path))
    assert "resuming: 5 of 6 shards already finished" in capsys.readouterr().err
    _same_dataset(out, tmp_path / "reference")


def test_kill_during_preprocessing_then_rerun_matches_uninterrupted(tmp_path, tokenizer_path, capsys):
    from preprocess_corpus import image_bytes, write_jsonl_with_paths

    folder = tmp_path / "data"
    jsonl = write_jsonl_with_paths(str(folder), 16)  # even rows carry img/1_<row>.png
    blocker = folder / "img" / "1_14.png"  # record 14 is in the last of 3 shards (6 records each)
    os.remove(blocker)
    os.mkfifo(blocker)  # reading it blocks: the run hangs in its last shard after finishing the first two
    out = tmp_path / "out"
    argv = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", jsonl, "--output",
            str(out), "--tokenizer", tokenizer_path, "--resolution", "8", "--min-image-size", "8",
            "--seq-length", "64", "--records-per-shard", "6", "--chunk-records", "4", "--no-progress"]
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    marker = out / "shards" / "shard-00001.done.json"
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no shard finished within 120 s"
            time.sleep(0.05)
        time.sleep(0.2)
        assert proc.poll() is None  # blocked on the pipe, i.e. before the end
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists() and not (out / "tokens.idx").exists()
    assert not (out / "shards" / "shard-00002.done.json").exists()

    os.remove(blocker)
    with open(blocker, "wb") as f:
        f.write(image_bytes(1 * 7919 + 14, (16, 16)))
    from preprocess_corpus import load_tool

    main = load_tool("preprocess_data").main
    capsys.readouterr()
    main(argv[2:])  # the same command, in-process
    assert "resuming: 2 of 3 shards already finished" in capsys.readouterr().err
    main(argv[2:] + ["--workers", "2"] + ["--output", str(tmp_path / "uninterrupted")])
    _same_dataset(out, tmp_path / "uninterrupted")
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["counts"]["documents"] == 16 and manifest["counts"]["images"] == 8


class _FailingEncoder:
    """Pixel encoder stand-ins that fail inside a worker: by raising, or by the worker process dying."""

    @staticmethod
    def build(mode):
        from megafusion.encoders.pixel import PixelEncoder

        class Failing(PixelEncoder):
            def _encode(self, pixels):
                if mode == "raise":
                    raise RuntimeError("encoder exploded")
                os.kill(os.getpid(), signal.SIGKILL)

        return Failing


@pytest.mark.parametrize("mode, needle", [("raise", "encoder exploded"), ("die", "BrokenProcessPool")])
def test_failing_worker_fails_the_run(tmp_path, inputs, tokenizer_path, mode, needle):
    from megafusion.encoders import register_encoder

    register_encoder(f"failing-{mode}", _FailingEncoder.build(mode))  # inherited by the forked workers
    with pytest.raises(PreprocessError, match=needle):
        run_preprocess(_opts(inputs, tmp_path / "out", tokenizer_path, encoder=f"failing-{mode}", workers=2))
    assert not (tmp_path / "out" / "manifest.json").exists()
