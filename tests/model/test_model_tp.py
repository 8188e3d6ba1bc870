"""Model parallelism on 2 gloo processes: MultimodalModel at TP=2 (the TP=1 weights sharded by hand following
megatron's layouts), at TP=2 with sequence parallelism, and as two pipeline stages gives the single-process loss
and gradients on the same weights; so does the Mixture-of-Transformers model (model.modality_attention) at TP=2
and as two stages."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from distributed import run_distributed

# every available attention backend runs in the same two processes (one spawn: imports dominate the test time)
BACKENDS = ["dense"] + (["segmented"] if importlib.util.find_spec("megafusion.model.attention.segmented") else [])


def _make_config(tp: int, backend: str, pp: int = 1, sequence_parallel: bool = False, modality_ffn: bool = True,
                 modality_attention: bool = False):
    from megafusion.config.schema import Config, DataConfig, ModelConfig, ParallelConfig, TrainingConfig
    from megafusion.model.transformer_config import build_transformer_config

    cfg = Config(
        model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                          vocab_size=200, latent_channels=4, latent_size=4, patch_size=2, attention_backend=backend,
                          transformer_impl="local", modality_ffn=modality_ffn,
                          modality_attention=modality_attention),
        data=DataConfig(seq_length=64),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                sequence_parallel=sequence_parallel),
        training=TrainingConfig(precision="fp32"),
    )
    return build_transformer_config(cfg)


def _batch(config):
    from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec

    spec = SyntheticSpec(config.vocab_size, 64, config.patch_dim, 4, kind="mixed", fill=0.95)
    batch = SyntheticDocuments(spec, seed=3).batch(2)
    g = torch.Generator().manual_seed(3)
    n = batch.num_latent_positions
    t = torch.rand(n, generator=g)
    noise = torch.randn(n, config.patch_dim, generator=g)
    return batch.replace(noisy_latents=t[:, None] * batch.latents + (1 - t[:, None]) * noise, latent_t=t,
                         velocity_target=batch.latents - noise, fm_loss_mask=torch.ones(n))


def _loss(out, batch):
    """Sum of vocab-parallel CE over text targets + sum of per-row MSE over latent rows."""
    from megatron.core import tensor_parallel

    ce = tensor_parallel.vocab_parallel_cross_entropy(out.logits, batch.labels.transpose(0, 1).contiguous())  # [s, b]
    ce = (ce * batch.loss_mask.transpose(0, 1)).sum()
    fm = ((out.velocity - batch.velocity_target) ** 2).mean(-1)
    return ce + (fm * batch.fm_loss_mask).sum()


def _shard(name: str, full: torch.Tensor, param: torch.Tensor, gated: bool, rank: int, tp: int) -> torch.Tensor:
    """The TP rank's slice of a TP=1 tensor. fc1 of SwiGLU holds [gate; up], each split separately; the GQA qkv
    weight is grouped per query group, so a contiguous split keeps whole groups."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if gated and name.endswith("linear_fc1.weight"):
        return torch.cat([half.chunk(tp, dim)[rank] for half in full.chunk(2, 0)], 0)
    return full.chunk(tp, dim)[rank]


def _single_process_reference(backend: str, modality_attention: bool = False):
    """The TP=PP=1 model on the test batch (each rank computes it; data parallel with nothing to communicate):
    (config, batch, loss, weights by name, gradients by name)."""
    from megatron.core import parallel_state as ps

    from megafusion.model import MultimodalModel

    ps.initialize_model_parallel(1, 1)
    config = _make_config(1, backend, modality_attention=modality_attention)
    torch.manual_seed(0)
    reference = MultimodalModel(config)
    batch = _batch(config)
    loss = _loss(reference(batch), batch)
    loss.backward()
    weights = {n: p.detach().clone() for n, p in reference.named_parameters()}
    grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    ps.destroy_model_parallel()
    return config, batch, loss, weights, grads


def _tp_worker(rank, world_size, out_dir, backends):
    for backend in backends:
        _compare_tp2_with_tp1(rank, out_dir, backend)
    _compare_tp2_with_tp1(rank, out_dir, backends[-1], sequence_parallel=True)
    _compare_pp2_with_pp1(rank, out_dir)
    # BAGEL's Mixture-of-Transformers: per-modality projections column / row parallel, and split over stages
    _compare_tp2_with_tp1(rank, out_dir, "dense", modality_attention=True)
    _compare_pp2_with_pp1(rank, out_dir, modality_attention=True)


def _compare_pp2_with_pp1(rank, out_dir, modality_attention=False):
    """Two pipeline stages driven by hand (send/recv of [s, b, h] and its gradient; megatron's schedules are the
    training loop's business): stage 0 embeds, stage 1 takes set_input_tensor and returns ModelOutput; both build
    the layout from the same Batch. Loss and gradients equal the one-stage model's."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megafusion.model import ModelOutput, MultimodalModel

    config1, batch, loss1, weights, grads = _single_process_reference("dense", modality_attention)

    ps.initialize_model_parallel(1, 2)
    config2 = _make_config(1, "dense", pp=2, modality_attention=modality_attention)
    first, last = rank == 0, rank == 1
    stage = MultimodalModel(config2, pre_process=first, post_process=last)
    assert len(stage.decoder.layers) == 1

    def global_name(name):
        if name.startswith("decoder.layers."):
            local, rest = name[len("decoder.layers."):].split(".", 1)
            return f"decoder.layers.{stage.decoder.layers[int(local)].layer_number - 1}.{rest}"
        return name

    names = {global_name(n): p for n, p in stage.named_parameters()}
    with torch.no_grad():
        for name, param in names.items():
            param.copy_(weights[name])
    shape = (batch.seq_length, batch.batch_size, config2.hidden_size)
    report = {"loss1": loss1.item(), "grad_rel": {}}
    if first:
        hidden = stage(batch)
        assert not isinstance(hidden, ModelOutput) and tuple(hidden.shape) == shape
        dist.send(hidden.detach().contiguous(), dst=1)
        grad = torch.empty(shape)
        dist.recv(grad, src=1)
        hidden.backward(grad)
    else:
        received = torch.empty(shape)
        dist.recv(received, src=0)
        received.requires_grad_(True)
        stage.set_input_tensor(received)
        loss2 = _loss(stage(batch), batch)
        loss2.backward()
        dist.send(received.grad.contiguous(), dst=0)
        report["loss2"] = loss2.item()
    for name, param in names.items():
        report["grad_rel"][name] = ((param.grad - grads[name]).norm() / grads[name].norm().clamp_min(1e-30)).item()
    ps.destroy_model_parallel()
    label = "pp_mot" if modality_attention else "pp"
    with open(os.path.join(out_dir, f"{label}_rank{rank}.json"), "w") as f:
        json.dump(report, f)


def _compare_tp2_with_tp1(rank, out_dir, backend, sequence_parallel=False, modality_attention=False):
    """With sequence parallelism the layers pass [s/2, b, h] between them, and the norms' gradients are partial
    sums that megatron's finalize_model_grads all-reduces over TP (done here by hand)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megafusion.model import MultimodalModel

    config1, batch, loss1, weights, grads = _single_process_reference(backend, modality_attention)

    ps.initialize_model_parallel(2, 1)
    if sequence_parallel:  # megatron's sequence-parallel linears (gather buffers) and RNG tracker need CUDA
        from megatron.core import tensor_parallel

        from megafusion.parallel.cpu_compat import enable_cpu_compat

        enable_cpu_compat()
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    config2 = _make_config(2, backend, sequence_parallel=sequence_parallel, modality_attention=modality_attention)
    assert config2.padded_vocab_size == config1.padded_vocab_size
    model = MultimodalModel(config2)
    shapes = []
    model.decoder.layers[0].register_forward_hook(lambda module, args, out: shapes.append(tuple(out[0].shape)))
    assert model.output_layer.weight.shape[0] == config2.padded_vocab_size // 2
    names = dict(model.named_parameters())
    assert set(names) == set(weights)
    with torch.no_grad():
        for name, param in names.items():
            param.copy_(_shard(name, weights[name], param, config2.gated_linear_unit, rank, 2))
    loss2 = _loss(model(batch), batch)
    loss2.backward()
    assert shapes == [(batch.seq_length // 2 if sequence_parallel else batch.seq_length, batch.batch_size,
                       config2.hidden_size)], shapes
    partial = [p for p in names.values() if getattr(p, "sequence_parallel", False)]
    assert bool(partial) == sequence_parallel, [n for n, p in names.items() if p in partial]
    for param in partial:
        dist.all_reduce(param.grad, group=ps.get_tensor_model_parallel_group())
    if sequence_parallel:
        _check_shared_ffn_padding_mask_is_local(rank, backend, batch)

    report = {"loss1": loss1.item(), "loss2": loss2.item(), "grad_rel": {}}
    for name, param in names.items():
        expected = _shard(name, grads[name], param, config2.gated_linear_unit, rank, 2)
        report["grad_rel"][name] = ((param.grad - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    ps.destroy_model_parallel()
    label = f"{backend}_sp" if sequence_parallel else (f"{backend}_mot" if modality_attention else backend)
    with open(os.path.join(out_dir, f"{label}_rank{rank}.json"), "w") as f:
        json.dump(report, f)


def _check_shared_ffn_padding_mask_is_local(rank, backend, batch):
    """A shared (non-modality) FFN gets megatron's [b, s] padding mask (MoE routing statistics); under sequence
    parallelism, this rank's [b, s/2] slice of it, matching its slice of the hidden states."""
    from megafusion.model import MultimodalModel

    model = MultimodalModel(_make_config(2, backend, sequence_parallel=True, modality_ffn=False))
    masks = []
    model.decoder.layers[0].mlp.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["padding_mask"]), with_kwargs=True)
    model(batch)
    half = batch.seq_length // 2
    expected = (batch.document_ids < 0)[:, rank * half:(rank + 1) * half]
    assert (batch.document_ids < 0).any(), "the batch should hold padding"
    assert len(masks) == 1 and masks[0].shape == expected.shape and torch.equal(masks[0], expected)


@pytest.mark.distributed
def test_tp2_sp_and_pp2_loss_and_gradients_equal_single_process(tmp_path):
    run_distributed(_tp_worker, world_size=2, args=(str(tmp_path), BACKENDS))
    for backend in BACKENDS + [f"{BACKENDS[-1]}_sp", "dense_mot"]:
        for rank in range(2):
            _check(json.loads((tmp_path / f"{backend}_rank{rank}.json").read_text()), backend, rank)
    for label in ("pp", "pp_mot"):
        stages = [json.loads((tmp_path / f"{label}_rank{rank}.json").read_text()) for rank in range(2)]
        stages[0]["loss2"] = stages[1]["loss2"]
        assert set(stages[0]["grad_rel"]) | set(stages[1]["grad_rel"]) >= {"embedding.word_embeddings.weight",
                                                                         "output_layer.weight"}
        for rank, report in enumerate(stages):
            _check(report, f"pipeline stage ({label})", rank)
    mot = json.loads((tmp_path / "dense_mot_rank0.json").read_text())["grad_rel"]
    assert "decoder.layers.1.self_attention.linear_qkv.image.weight" in mot


def _check(report, backend, rank):
    assert abs(report["loss2"] - report["loss1"]) <= 1e-5 * abs(report["loss1"]), (backend, rank, report)
    worst = max(report["grad_rel"].items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-5, f"{backend} rank {rank}: gradient of {worst[0]} differs by {worst[1]:.2e} (relative)"
