"""`megafusion train` reports bad input before any compute as one line naming the file, folder or flag (no
traceback), with exit status 2 for a config that does not parse and 1 for the rest."""

from __future__ import annotations

import numpy as np
import pytest

from megafusion.cli import main
from tests.data.fixtures import random_docs, rewrite_manifest, write_dataset

FAST = ["training.train_steps=1", "optimizer.warmup_steps=0", "training.global_batch_size=2", "training.micro_batch_size=2",
        "data.num_workers=0", "logging.tensorboard=false"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_yaml_whose_top_level_is_not_a_mapping(tmp_path, capsys):
    bad = tmp_path / "list.yaml"
    bad.write_text("- model\n- data\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert _one_line(capsys) == (f"megafusion train: {bad}: the top level must be a mapping of sections "
                                 f"(model:, data:, training:, ...), found a list")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [\n")
    assert main(["train", "--config", str(broken)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"megafusion train: {broken}: not valid YAML") and "line 2, column 1" in line


def test_run_dir_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", "--config", "tiny", f"training.run_dir={blocker}/run", *FAST]) == 1
    assert _one_line(capsys) == (f"megafusion train: training.run_dir={blocker}/run: cannot write there "
                                 f"(Not a directory); choose a writable folder")
    assert main(["train", "--config", "tiny", f"training.run_dir={tmp_path}/ok",
                 f"checkpoint.save_dir={blocker}/ckpt", *FAST]) == 1
    assert "checkpoint.save_dir=" in _one_line(capsys)


def test_vocabulary_smaller_than_the_datasets_tokenizer(tmp_path, capsys, monkeypatch):
    from megafusion.training import loop

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data was validated")

    monkeypatch.setattr(loop, "wrap_model", no_model)
    folder = write_dataset(str(tmp_path / "ds"), random_docs(np.random.default_rng(1), 8, vocab=200))
    rewrite_manifest(folder, lambda m: m["tokenizer"].update(vocab_size=1000))
    code = main(["train", "--config", "tiny", f"training.run_dir={tmp_path}/run", f"data.paths=[{folder}]",
                 "model.latent_channels=4", "model.latent_size=8", "model.vocab_size=512", *FAST])
    assert code == 1
    assert _one_line(capsys) == (f"megafusion train: model.vocab_size=512 is smaller than the tokenizer vocabulary "
                                 f"1000 of {folder} ({folder}/manifest.json tokenizer.vocab_size); set "
                                 f"model.vocab_size=1000")


@pytest.mark.parametrize("debug", [False, True])
def test_megafusion_debug_keeps_the_traceback(tmp_path, capsys, monkeypatch, debug):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    if debug:
        monkeypatch.setenv("MEGAFUSION_DEBUG", "1")
        with pytest.raises(RuntimeError, match="cannot write there"):
            main(["train", "--config", "tiny", f"training.run_dir={blocker}/run", *FAST])
    else:
        assert main(["train", "--config", "tiny", f"training.run_dir={blocker}/run", *FAST]) == 1
