"""`megafusion plan`: a table by default, one parseable JSON object with --json, exit 3 for a plan that does not
fit, and one line naming the flag for a layout or value that is wrong (exit 2)."""

from __future__ import annotations

import json

import pytest

from megafusion.cli import main
from megafusion.planning.cli import parse_memory


def test_reference_on_128_gpus_prints_a_table(capsys):
    assert main(["plan", "--config", "reference", "--gpus", "128"]) == 0
    out = capsys.readouterr().out
    assert "TP 1 x PP 1 x DP 128" in out and "micro-batch 4 x 1 per step" in out
    for row in ("ffn.text", "ffn.image", "active per text token", "gradients (fp32)", "activations: ffn",
                "transient: logits (cross-entropy)", "cuda context", "FLOPs per step", "wall-clock"):
        assert row in out, row
    assert "fits:" in out and "training.flops_budget=1.00e+21" in out


def test_json_is_parseable_and_consistent(capsys):
    assert main(["plan", "--config", "7b", "--gpus", "32", "--json", "--mfu", "0.5", "--peak-tflops", "1000",
                 "--gpu-memory", "141GB"]) == 0
    plan = json.loads(capsys.readouterr().out)
    lay = plan["layout"]
    assert (lay["tp"], lay["pp"], lay["dp"], lay["microbatches_per_step"]) == (2, 2, 8, 128)
    assert plan["parameters"]["total"] == sum(plan["parameters"]["by_group"].values())
    memory = plan["memory"]
    assert memory["fits"] and memory["gpu_bytes"] == 141 * 2**30
    assert [s["stage"] for s in memory["stages"]] == [0, 1]
    assert memory["peak_bytes"] == max(s["total_bytes"] for s in memory["stages"])
    compute = plan["compute"]
    assert compute["steps"] == int(compute["flops_budget"] // compute["flops_per_step"])
    assert compute["wall_clock_seconds"] == pytest.approx(
        compute["steps"] * compute["flops_per_step"] / (32 * 1000e12 * 0.5))


def test_a_plan_that_does_not_fit_exits_3_naming_the_largest_term(capsys):
    assert main(["plan", "--config", "reference_moe1008", "--gpus", "128", "training.recompute=none",
                 "--gpu-memory", "40GB"]) == 3
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "largest term: gradients (fp32)" in out


@pytest.mark.parametrize("argv, message", [
    (["--config", "7b", "--gpus", "30"], "--gpus=30 is not divisible by parallel.tensor_model_parallel_size (2) x "
                                          "parallel.pipeline_model_parallel_size (2) = 4"),
    (["--config", "reference_moe32", "--gpus", "4"], "parallel.expert_model_parallel_size=8 must divide the "
                                                     "data-parallel size 4 (--gpus=4"),
    (["--config", "reference", "--gpus", "96"], "training.global_batch_size=512 is not a multiple of "
                                                "training.micro_batch_size x data-parallel size = 4 x 96 (--gpus=96)"),
    (["--config", "reference", "--gpus", "0"], "--gpus=0 must be a positive number of GPUs"),
    (["--config", "reference", "--gpus", "128", "--gpu-memory", "lots"], "--gpu-memory='lots' is not a positive size"),
    (["--config", "reference", "--gpus", "128", "--mfu", "1.5"], "--mfu=1.5 must be in (0, 1]"),
    (["--config", "reference", "--gpus", "128", "model.ffn_hidden_size=8191",
      "parallel.tensor_model_parallel_size=2"], "model.ffn_hidden_size=8191 is not divisible by "
                                                 "parallel.tensor_model_parallel_size=2"),
    (["--config", "nope", "--gpus", "8"], "config 'nope' is neither a file nor a preset"),
])
def test_bad_input_is_one_line_naming_the_flag(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("megafusion plan: ") and message in err, err


def test_memory_sizes_parse():
    assert parse_memory("80GB") == parse_memory("80 GiB") == parse_memory("80") == 80 * 2**30
    assert parse_memory("81920MB") == 80 * 2**30 and parse_memory("1.5TB") == 1.5 * 2**40
