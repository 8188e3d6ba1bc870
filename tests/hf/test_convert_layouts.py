"""A checkpoint saved with TP=2 x PP=2 (4 gloo processes), with EP=2 (MoE, 2 processes) or with TP=2 (the
Mixture-of-Transformers model) converts in one process to exactly the folder its single-process original
converts to; and the exported folder loads with
trust_remote_code in a process that cannot import megafusion, computing what megafusion computes."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from distributed import run_distributed

pytest.importorskip("transformers")

MOE = ["model.moe.num_experts=4", "model.moe.ffn_hidden_size=32", "model.moe.modalities=[image]"]


def tiny_overrides(extra=()):
    from tiny_model import CHANNELS, CONTEXT, LATENT_SIZE, PATCH, VOCAB

    return ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.ffn_hidden_size=96", f"model.vocab_size={VOCAB}", f"model.latent_channels={CHANNELS}",
            f"model.latent_size={LATENT_SIZE}", f"model.patch_size={PATCH}", "model.transformer_impl=local",
            f"data.seq_length={CONTEXT}", "training.precision=fp32", *extra]


def save_random_checkpoint(root, overrides, seed=0):
    """One process: a random tiny model saved as a megafusion checkpoint at step 0 (TP = PP = EP = 1)."""
    from megafusion.checkpoint.checkpointer import save_checkpoint
    from megafusion.checkpoint.train_state import TrainState
    from megafusion.config import load_config, to_yaml
    from megafusion.model import model_provider
    from megafusion.parallel.initialize import destroy_parallel, initialize_parallel

    cfg = load_config(None, overrides)
    initialize_parallel(cfg.parallel, seed)
    try:
        torch.manual_seed(seed)
        model = model_provider(cfg)
        save_checkpoint(root, TrainState(), [model], None, config_yaml=to_yaml(cfg), keep_last=1)
    finally:
        destroy_parallel()


def _resave(rank, world_size, source, target, layout):
    """Load `source` into this rank's chunks of `layout` (dist_checkpointing reshards) and save it there."""
    from megafusion.checkpoint.checkpointer import load_checkpoint, save_checkpoint
    from megafusion.checkpoint.train_state import TrainState
    from megafusion.config import load_config, to_yaml
    from megafusion.model import model_provider
    from megafusion.parallel.initialize import initialize_parallel
    from megafusion.parallel.wrapping import build_model_chunks

    cfg = load_config(os.path.join(source, "iter_0000000", "config.yaml"), layout)
    initialize_parallel(cfg.parallel, 0)
    chunks = build_model_chunks(functools.partial(model_provider, cfg))
    load_checkpoint(os.path.join(source, "iter_0000000"), chunks)
    save_checkpoint(target, TrainState(), chunks, None, config_yaml=to_yaml(cfg), keep_last=1)


def hf_tensors(path):
    from megafusion.hf.folder import HFFolder

    folder = HFFolder(path)
    return {name: folder.tensor(name) for name in folder.weight_map}


@pytest.mark.parametrize("name,extra,layout,world", [
    ("tp2_pp2", [], ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"], 4),
    ("ep2", MOE, ["parallel.expert_model_parallel_size=2"], 2),
    ("mot_tp2", ["model.modality_attention=true"], ["parallel.tensor_model_parallel_size=2"], 2),
])
def test_a_parallel_checkpoint_converts_to_the_same_folder(tmp_path, name, extra, layout, world):
    from megafusion.hf.export import to_hf

    single, parallel = tmp_path / "single", tmp_path / name
    save_random_checkpoint(single, tiny_overrides(extra))
    run_distributed(_resave, world_size=world, args=(str(single), str(parallel), layout))
    saved = json.loads((parallel / "iter_0000000" / "megafusion_complete.json").read_text())["layout"]
    assert saved["world_size"] == world  # really written by `world` ranks
    to_hf(single, tmp_path / "hf_single", dtype="fp32")
    to_hf(parallel, tmp_path / "hf_parallel", dtype="fp32")
    a, b = hf_tensors(tmp_path / "hf_single"), hf_tensors(tmp_path / "hf_parallel")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if extra == MOE:
        assert "model.layers.1.mlp.image.experts.3.down_proj.weight" in a
    if name == "mot_tp2":
        assert "model.layers.1.self_attn.image.q_proj.weight" in a


REMOTE = r"""
import importlib.abc, sys
class NoMegafusion(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "megafusion" or name.startswith("megafusion."):
            raise ImportError("megafusion is not installed here")
sys.meta_path.insert(0, NoMegafusion())
sys.path = [p for p in sys.path if p not in ("", {repo!r})]
import torch
from transformers import AutoModel
try:
    import megafusion  # noqa
    raise SystemExit("megafusion is importable")
except ImportError:
    pass
model = AutoModel.from_pretrained({folder!r}, trust_remote_code=True).eval()
assert "megafusion" not in type(model).__module__.split(".")[0], type(model).__module__
inputs = torch.load({inputs!r})
with torch.no_grad():
    out = model(**inputs)
torch.save({{"logits": out.logits, "velocity": out.velocity}}, {result!r})
"""


def test_remote_code_loads_where_megafusion_cannot_be_imported(tmp_path):
    from megafusion.hf.export import to_hf
    from megafusion.inference.loading import load_for_generation
    from megafusion.parallel.initialize import destroy_parallel
    from megafusion.model.attention.layout import AttentionLayout
    from mixed_batch import hf_inputs, mixed_batch

    root = tmp_path / "ckpt"
    save_random_checkpoint(root, tiny_overrides(MOE))
    to_hf(root, tmp_path / "hf", dtype="fp32")
    gen = load_for_generation(root, precision="fp32", device="cpu")
    batch = mixed_batch()
    try:
        with torch.no_grad():
            ref = gen.model(batch, AttentionLayout.from_batch(batch))
    finally:
        destroy_parallel()
    torch.save(hf_inputs(batch), tmp_path / "inputs.pt")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = REMOTE.format(repo=repo, folder=str(tmp_path / "hf"), inputs=str(tmp_path / "inputs.pt"),
                           result=str(tmp_path / "out.pt"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # the remote code is copied into a fresh modules cache
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    vocab = ref.logits.shape[-1]
    assert (out["logits"].transpose(0, 1)[..., :vocab] - ref.logits).abs().max().item() <= 1e-5
    assert (out["velocity"] - ref.velocity).abs().max().item() <= 1e-5


SUMMARY = re.compile(r"peak memory [\d.]+ MiB \(([\d.]+) MiB above .*, model ([\d.]+) MiB\)")


def test_conversion_holds_one_model_copy_not_two(tmp_path):
    """A 290 MiB model both ways in fresh processes (their peak is their own): the memory above what the process
    held before loading stays well under two model copies (model + one 20 MB shard + the loaders' buffers)."""
    overrides = tiny_overrides() + ["model.num_layers=8", "model.hidden_size=512", "model.num_attention_heads=8",
                                    "model.num_query_groups=null", "model.ffn_hidden_size=null",
                                    "model.vocab_size=32000"]
    save_random_checkpoint(tmp_path / "ckpt", overrides)
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                        "convert_checkpoint.py")
    runs = [["to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf", "--dtype", "fp32",
             "--max-shard-size", "20MB"], ["from-hf", "--hf", tmp_path / "hf", "--out", tmp_path / "back"]]
    for argv in runs:
        proc = subprocess.run([sys.executable, tool, *map(str, argv)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        extra, model = (float(x) for x in SUMMARY.search(proc.stdout).groups())
        assert model > 250 and extra < 1.6 * model, (argv[0], proc.stdout)
