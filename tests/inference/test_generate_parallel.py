"""Generation across layouts (gloo processes): TP=2 generates what one process generates, and a checkpoint trained
with PP=2 (or with EP=2 mixture-of-experts layers) generates in one process what its TP=1/PP=1/EP=1 re-save
generates."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed

pytestmark = [pytest.mark.distributed]


def _prompts(patches: int, patch_dim: int):
    from megafusion.inference.engine import Prompt

    g = torch.Generator().manual_seed(0)
    return [Prompt(parts=[[20, 21, 22]], seed=1, id="t2i", force_image=True),
            Prompt(parts=[torch.randn(1, patches, patch_dim, generator=g), [30, 31]], seed=2, id="caption"),
            Prompt(parts=[[40, 41]], seed=3, id="video", force_image=True, frames=2)]


def _generate_worker(rank, world_size, checkpoint, out_file):
    from megafusion.inference.loading import load_for_generation
    from megafusion.inference.settings import GenerationConfig
    from megafusion.parallel.initialize import destroy_parallel

    gen = load_for_generation(checkpoint)
    try:
        m = gen.cfg.model
        prompts = _prompts((m.latent_size // m.patch_size) ** 2, m.latent_channels * m.patch_size ** 2)
        settings = GenerationConfig(max_new_tokens=6, temperature=1.0, top_k=30, steps=3, cfg_scale=2.5)
        results = gen.engine.generate(prompts, settings)
    finally:
        destroy_parallel()
    if rank == 0:
        torch.save([(r.tokens, r.media, r.stop_reason) for r in results], out_file)


def _generate(checkpoint, tmp_path, name, world_size):
    out = tmp_path / f"{name}.pt"
    run_distributed(_generate_worker, world_size, args=(str(checkpoint), str(out)))
    return torch.load(out)


def _assert_same(a, b):
    for (tokens_a, media_a, stop_a), (tokens_b, media_b, stop_b) in zip(a, b):
        assert tokens_a == tokens_b and stop_a == stop_b
        assert len(media_a) == len(media_b) > 0 or len(media_a) == len(media_b) == 0
        for x, y in zip(media_a, media_b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_tensor_parallel_generation_equals_one_process(trained_run, tmp_path):
    one = _generate(trained_run.run, tmp_path, "tp1", 1)
    two = _generate(trained_run.run, tmp_path, "tp2", 2)
    _assert_same(one, two)
    assert [len(m) for _, m, _ in one] == [1, 0, 1]


def _resave_worker(rank, world_size, checkpoint, save_dir):
    from megafusion.checkpoint import TrainState, save_checkpoint
    from megafusion.config import to_yaml
    from megafusion.inference.loading import load_for_generation
    from megafusion.parallel.initialize import destroy_parallel

    gen = load_for_generation(checkpoint)
    try:
        save_checkpoint(save_dir, TrainState(step=gen.step), [gen.model], config_yaml=to_yaml(gen.cfg))
    finally:
        destroy_parallel()


@pytest.mark.parametrize("layout", [
    ["parallel.pipeline_model_parallel_size=2"],
    ["parallel.expert_model_parallel_size=2", "model.moe.num_experts=4", "model.moe.router_topk=2"],
], ids=["pp2", "ep2-moe"])
def test_a_parallel_trained_checkpoint_generates_like_its_single_process_resave(tmp_path, layout):
    from loop_harness import run_train

    saved = tmp_path / "saved"
    run_train(tmp_path, "train", layout + ["training.train_steps=2", "checkpoint.save_at_end=true",
                                           f"checkpoint.save_dir={saved}"], world_size=2)
    resaved = tmp_path / "resaved"
    run_distributed(_resave_worker, 1, args=(str(saved), str(resaved)))
    assert (resaved / "iter_0000002" / "megafusion_complete.json").is_file()
    _assert_same(_generate(saved, tmp_path, "from_saved", 1), _generate(resaved, tmp_path, "from_resave", 1))
