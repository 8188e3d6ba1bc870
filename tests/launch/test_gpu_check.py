"""The GPU check's pieces that CPU machines can test: benchmarks/gpu_train.py parses its arguments, says clearly
that it needs CUDA (exit status 2) instead of failing somewhere inside, and its slice of the reference setup is a
valid ~1B-parameter one-GPU config (scripts/gpu_check.sh trains it)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megafusion.config import load_config
from megafusion.config.loading import PRESET_DIR

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_train.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments_parse_and_are_checked():
    gpu_train = _module()
    args = gpu_train.parse_args([])
    assert (args.preset, args.layers, args.backend, args.warmup, args.steps) == ("reference", 8, "flex", 3, 10)
    args = gpu_train.parse_args(["--layers", "4", "--seq-length", "2048", "--peak-tflops", "989", "--no-reference"])
    assert args.layers == 4 and args.seq_length == 2048 and args.peak_tflops == 989 and args.no_reference
    for bad in (["--steps", "0"], ["--warmup", "0"], ["--backend", "magic"], ["--peak-tflops", "-1"]):
        with pytest.raises(SystemExit) as exc:
            gpu_train.parse_args(bad)
        assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_exits_with_a_clear_message():
    out = subprocess.run([sys.executable, str(SCRIPT), "--steps", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "needs a CUDA GPU" in out.stderr and "torch.cuda.is_available() is False" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(not (Path(PRESET_DIR) / "reference.yaml").exists(), reason="configs/reference.yaml not there")
def test_the_slice_is_a_one_gpu_bf16_flex_config_of_about_1b_parameters(capsys):
    gpu_train = _module()
    assert gpu_train.main(["--print-slice-overrides", "--warmup", "1", "--steps", "29"]) == 0
    overrides = capsys.readouterr().out.split()
    cfg = load_config("reference", overrides)
    assert cfg.model.attention_backend == "flex" and cfg.training.precision == "bf16"
    assert cfg.training.train_steps == 30 and cfg.data.paths == []
    p = cfg.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size) == (1, 1, 1)
    counts = pytest.importorskip("megafusion.planning", reason="megafusion.planning counts the parameters")
    total = counts.count_parameters(cfg).total
    assert 0.8e9 < total < 1.3e9, total
