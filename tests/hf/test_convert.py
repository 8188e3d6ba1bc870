"""tools/convert_checkpoint.py on a tiny trained run: the exported folder (files, tokenizer, shards), the
megafusion -> HF -> megafusion round trip (bit-identical), generation from the folder equal to generation from the
checkpoint, from-hf -> train -> to-hf, and every bad input named before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megafusion.hf import folder as hf_folder

pytest.importorskip("transformers")


def tool(*argv) -> int:
    from preprocess_corpus import load_tool

    return load_tool("convert_checkpoint").main([str(a) for a in argv])


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny"
    assert tool("to-hf", "--checkpoint", trained_run.run, "--out", out, "--dtype", "fp32") == 0
    return out


def megafusion_weights(checkpoint) -> dict:
    from megafusion.hf.export import load_single_process

    _, model, _, _ = load_single_process(checkpoint)
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def hf_weights(path) -> dict:
    folder = hf_folder.HFFolder(path)
    return {name: folder.tensor(name) for name in folder.weight_map}


def test_exported_folder_has_everything_a_transformers_user_needs(exported, trained_run):
    from transformers import AutoTokenizer, GenerationConfig

    from megafusion.preprocess.tokenization import TextTokenizer

    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json", "configuration_megafusion.py", "modeling_megafusion.py"} <= names
    assert not any(n.startswith(".") for n in names) and not list(exported.parent.glob(".*partial*"))
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "megafusion" and config["auto_map"]["AutoModel"].startswith("modeling_megafusion.")
    manifest = json.loads((trained_run.dataset / "manifest.json").read_text())
    assert config["encoder"] == {"name": manifest["encoder"]["name"], "config": manifest["encoder"]["config"]}
    gen = GenerationConfig.from_pretrained(exported)
    assert gen.num_inference_steps == 25 and gen.guidance_scale == 3.0 and gen.boi_token_id == 4
    assert gen.max_length == 128 and gen.eos_token_id == 2
    text = "a red circle on the left"
    ours = TextTokenizer(trained_run.tokenizer)
    theirs = AutoTokenizer.from_pretrained(exported)
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    assert theirs.convert_tokens_to_ids("<boi>") == 4 and theirs.eos_token_id == 2


def test_megafusion_to_hf_to_megafusion_is_bit_identical(exported, trained_run, tmp_path):
    back = tmp_path / "ckpt"
    assert tool("from-hf", "--hf", exported, "--out", back) == 0
    original, restored = megafusion_weights(trained_run.run), megafusion_weights(back)
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert (back / "tokenizer.model").is_file() and (back / "encoder.json").is_file()
    from megafusion.inference.loading import load_for_generation
    from megafusion.parallel.initialize import destroy_parallel

    gen = load_for_generation(back, precision="fp32")  # `megafusion generate --checkpoint` finds everything
    destroy_parallel()
    assert gen.tokenizer.path == str(back / "tokenizer.model") and gen.encoder is not None and gen.step == 0


def test_sharded_export_holds_the_same_tensors(exported, trained_run, tmp_path):
    out = tmp_path / "sharded"
    assert tool("to-hf", "--checkpoint", trained_run.run, "--out", out, "--dtype", "fp32",
                "--max-shard-size", "40KB") == 0
    index = json.loads((out / hf_folder.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / hf_folder.SINGLE_FILE).exists()
    single, sharded = hf_weights(exported), hf_weights(out)
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())


def test_bf16_export_casts_every_tensor(exported, trained_run, tmp_path):
    out = tmp_path / "bf16"
    assert tool("to-hf", "--checkpoint", trained_run.run, "--out", out) == 0  # bf16 is the default
    fp32, bf16 = hf_weights(exported), hf_weights(out)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(fp32[k].to(torch.bfloat16), bf16[k]) for k in fp32)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _generate(gen, prompt_file):
    from megafusion.inference.prompts import encode_prompts, read_prompt_file
    from megafusion.inference.settings import GenerationConfig

    prompts = encode_prompts(read_prompt_file(str(prompt_file)), gen.tokenizer, gen.encoder,
                             gen.cfg.model.patch_size)
    settings = GenerationConfig(steps=3, max_new_tokens=5, cfg_scale=2.0, temperature=0.8, top_k=20)
    return gen.engine.generate(prompts, settings)


def test_generation_from_the_hf_folder_equals_generation_from_the_checkpoint(exported, trained_run, tmp_path):
    from megafusion.hf.generation import load_hf_for_generation
    from megafusion.inference.loading import load_for_generation
    from megafusion.parallel.initialize import destroy_parallel

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in [
        {"id": "t2i", "text": "a red cat", "image": True, "seed": 3},
        {"id": "video", "text": "two", "image": True, "frames": 2, "seed": 4},
        {"id": "caption", "parts": [{"image": str(trained_run.image)}, {"text": "The"}], "seed": 5}]))

    gen = load_for_generation(trained_run.run, precision="fp32")
    try:
        reference = _generate(gen, prompts)
    finally:
        destroy_parallel()
    hf = load_hf_for_generation(exported, precision="fp32")
    results = _generate(hf, prompts)
    assert [r.tokens for r in results] == [r.tokens for r in reference]
    assert sum(len(r.media) for r in results) >= 2
    for ours, theirs in zip(results, reference):
        for a, b in zip(ours.media, theirs.media):
            assert (a - b).abs().max().item() <= 1e-5


def test_generate_command_runs_on_the_hf_folder(exported, trained_run, tmp_path):
    from megafusion.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "text": "a red cat", "image": True, "seed": 1}) + "\n")
    assert main(["generate", "--hf", str(exported), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                 "--steps", "2", "--max-new-tokens", "3", "--no-progress"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["hf"] == str(exported) and results["settings"]["cfg_scale"] == 3.0  # generation_config.json
    assert results["settings"]["steps"] == 2 and (tmp_path / "out" / "a_image0.png").is_file()


def test_from_hf_then_train_then_to_hf(exported, trained_run, tmp_path):
    from megafusion.config import load_config
    from megafusion.training.loop import train
    from trained_run import TRAIN_OVERRIDES

    ckpt = tmp_path / "ckpt"
    assert tool("from-hf", "--hf", exported, "--out", ckpt) == 0
    cfg_path = ckpt / "iter_0000000" / "config.yaml"
    run_dir = tmp_path / "run"
    train(load_config(str(cfg_path), TRAIN_OVERRIDES + [f"data.paths=[{trained_run.dataset}]",
                                                        "training.train_steps=2", f"training.run_dir={run_dir}",
                                                        f"checkpoint.load={ckpt}"]))
    again = tmp_path / "again"
    assert tool("to-hf", "--checkpoint", run_dir, "--out", again, "--dtype", "fp32") == 0
    before, after = hf_weights(exported), hf_weights(again)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # two optimizer steps moved the weights
    assert json.loads((again / "config.json").read_text())["megafusion_source"]["step"] == 2


# ------------------------------------------------------------------------------------------------ bad input
def test_refuses_an_existing_output_and_a_partial_checkpoint(exported, trained_run, tmp_path, capsys):
    assert tool("to-hf", "--checkpoint", trained_run.run, "--out", exported) == 1
    assert "already exists" in capsys.readouterr().err
    partial = tmp_path / "partial" / "iter_0000004"
    shutil.copytree(trained_run.run / "checkpoints" / "iter_0000004", partial)
    (partial / "megafusion_complete.json").unlink()
    assert tool("to-hf", "--checkpoint", partial, "--out", tmp_path / "x") == 1
    assert "partial checkpoint" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_missing_shard_and_index_entries_are_named(trained_run, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert tool("to-hf", "--checkpoint", trained_run.run, "--out", out, "--max-shard-size", "40KB") == 0
    index_path = out / hf_folder.INDEX_FILE
    index = json.loads(index_path.read_text())
    gone = "model.norm.weight"
    del index["weight_map"][gone]
    index["weight_map"]["model.layers.0.mystery.weight"] = index["weight_map"]["lm_head.weight"]
    index_path.write_text(json.dumps(index))
    assert tool("from-hf", "--hf", out, "--out", tmp_path / "c1") == 1
    err = capsys.readouterr().err
    assert f"missing tensors (1): {gone}" in err and "unknown tensors (1): model.layers.0.mystery.weight" in err
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert tool("from-hf", "--hf", out, "--out", tmp_path / "c2") == 1
    assert f"{shard.name} listed in {hf_folder.INDEX_FILE} are missing" in capsys.readouterr().err
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


def test_shape_mismatch_and_impossible_layouts_are_named(exported, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    tensors = load_file(bad / hf_folder.SINGLE_FILE)
    tensors["velocity_head.weight"] = tensors["velocity_head.weight"][:, :-1].contiguous()
    save_file(tensors, bad / hf_folder.SINGLE_FILE)
    assert tool("from-hf", "--hf", bad, "--out", tmp_path / "c1") == 1
    err = capsys.readouterr().err
    assert "velocity_head.weight" in err and str(tuple(tensors["velocity_head.weight"].shape)) in err
    heads = json.loads((exported / "config.json").read_text())["num_attention_heads"]
    assert tool("from-hf", "--hf", exported, "--out", tmp_path / "c2", "--tp", heads + 1) == 1
    err = capsys.readouterr().err
    assert f"--tp {heads + 1}" in err and "num_attention_heads" in err
    assert tool("from-hf", "--hf", exported, "--out", tmp_path / "c3", "--ep", 2) == 1
    assert "expert_model_parallel_size" in capsys.readouterr().err
    assert not any((tmp_path / c).exists() for c in ("c1", "c2", "c3"))
    assert not list(tmp_path.glob(".*partial*"))


KILL_SCRIPT = """
import os, signal, sys
import safetensors.torch as st
real = st.save_file
calls = []
def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
st.save_file = save_then_die
sys.path.insert(0, {tests!r})
from preprocess_corpus import load_tool
load_tool("convert_checkpoint").main(["to-hf", "--checkpoint", {run!r}, "--out", {out!r}, "--max-shard-size", "40KB"])
"""


def test_a_killed_conversion_leaves_nothing_that_looks_complete(trained_run, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "killed"
    tests = os.path.join(os.path.dirname(os.path.dirname(__file__)), "preprocess")
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(tests=tests, run=str(trained_run.run),
                                                                    out=str(out))], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    (partial,) = tmp_path.glob(".killed.partial-*")  # the staging folder, never under the final name
    assert len(list(partial.glob("model-*.safetensors"))) == 2 and not (partial / "config.json").exists()
