"""Activation memory of one micro-batch on one rank: what autograd keeps for the backward, layer by layer.

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022), count per layer
34sbh + 5as^2b bytes (16-bit activations, no recompute) for a GPT layer with GELU, dropout and h-wide attention;
/t with tensor + sequence parallelism, 34sbh/t with selective recompute, 2sbh with full recompute. Here the same
bookkeeping is redone for the tensors megafusion's layers actually save (per token; B = activation bytes, 2 in
bf16 / 4 in fp32; t = TP; r = 1/t under sequence parallelism, else 1; a = heads x head_dim, g = groups x head_dim):

    input norm        x, and its output for linear_qkv           2h r B   (+ h r B: CPU torch norm keeps x-hat)
    linear_qkv out    the fused QKV, kept alive by V (a view)    (a + 2g)/t B
    RoPE              rotated Q and K                            (a + g)/t B
    core attention    output + log-sum-exp (flash-like kernels)  a/t B + 4 nq/t      [selective recompute: 0]
    linear_proj in    the attention output, re-laid out          a/t B
    pre-FFN norm      x                                          h r B   (+ h r B on CPU)
    FFN input         modality FFN: the token's row, gathered    h B     (the whole sequence also under SP)
                      shared FFN: norm output                    h r B
    SwiGLU FFN        fc1 out 2f, silu f, linear half + 0 f, product (fc2 in) f      5f/t B   (GELU: 2f/t B)
    MoE FFN           per routed copy: the permuted expert input h, SwiGLU 5f_e and the activation scaled
                      by the routing probability f_e                                top-k (h + 6f_e) B
                      (GELU: h + 3f_e); a shared expert 5f_s/t B; router logits and probabilities  2 E 4
    dropout masks     (hidden_dropout > 0) 2h r bytes

GQA (g < a) shrinks the QKV terms; SwiGLU replaces Megatron's 8sbh GELU terms with 5f; modality FFNs route each
token through one FFN (its modality's width and MoE settings), weighted by the latent fraction. The attention
backend adds (per layer unless noted):

    dense  GPU: SDPA's math path (bool mask, GQA): fp32 probabilities   4 b nq/t s^2      [selective: 0]
           CPU: the flash kernel keeps the additive fp32 mask           4 b s^2           [selective: 0]
           + the [b, 1, s, s] bool mask cached in the layout (per micro-batch)
    te     multimodal batches use the `arbitrary` mask, unfused: bf16 probabilities 2 b nq/t s^2 + bool masks
    flex   the BlockMask (per micro-batch, int32 block tables, a few MB); otherwise flash-like
    segmented  flash-like; the key/value pieces of equal-shaped segments are concatenated (data dependent:
           counted as one more copy of K and V, 2g/t B)

Full recompute (uniform, one layer per checkpoint) keeps only each layer's input (h r B); the layer being
recomputed holds its full activations once more (a transient, memory.py).
"""

from __future__ import annotations

from typing import Dict

from megafusion.config.schema import Config
from megafusion.model.transformer_config import default_ffn_hidden_size
from megafusion.planning.layout import Profile

BATCH_BYTES_PER_POSITION = 53
"""A Batch's per-position fields: six int64 (tokens, labels, modality, block / document ids, context start), the
fp32 loss mask and the noised flag. Per latent position add 12 x patch_dim + 8 (latents, noisy latents, velocity
target in fp32, flow time, FM mask). The loop builds every micro-batch of a step before the schedule runs."""
LAYOUT_BYTES_PER_POSITION = 40
"""The AttentionLayout's cached indices (modality rows, their inverse permutations, latent rows, padding masks)."""
BLOCK = 128
"""flex_attention's block size (its BlockMask has (s / 128)^2 entries per table)."""


def _dims(cfg: Config, tp: int):
    m = cfg.model
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    heads = m.num_attention_heads // tp
    a = m.num_attention_heads * head_dim / tp
    g = (m.num_query_groups or m.num_attention_heads) * head_dim / tp
    return m.hidden_size, a, g, heads


def _ffn_per_token(cfg: Config, modality: str, tp: int, B: int, h: int, ffn_input: float) -> float:
    m = cfg.model
    glu = m.activation == "swiglu"
    f = m.ffn_hidden_size or default_ffn_hidden_size(h, m.activation)
    if m.moe.enabled and modality in m.moe.modalities:
        fe = m.moe.ffn_hidden_size or f
        per_copy = (h + (6 if glu else 3) * fe) * B
        shared = (5 if glu else 2) * (m.moe.shared_expert_intermediate_size or 0) / tp * B
        return ffn_input + m.moe.router_topk * per_copy + shared + 2 * m.moe.num_experts * 4
    return ffn_input + (5 if glu else 2) * f / tp * B


def layer_terms(cfg: Config, profile: Profile, tp: int, sequence_parallel: bool, latent_fraction: float,
                micro_batch: int) -> Dict[str, float]:
    """Bytes one layer keeps for the backward, per micro-batch, by term (before recompute is applied: the
    caller drops `core`/`scores` for selective recompute)."""
    s, b, B = cfg.data.seq_length, micro_batch, profile.act_bytes
    h, a, g, heads = _dims(cfg, tp)
    r = 1.0 / tp if sequence_parallel else 1.0
    extra_norm = h * r * B if profile.device == "cpu" else 0.0
    tokens = s * b
    modality_ffn = cfg.model.modality_ffn
    ffn_input = h * B if modality_ffn else h * r * B
    if modality_ffn:
        ffn = ((1 - latent_fraction) * _ffn_per_token(cfg, "text", tp, B, h, ffn_input)
               + latent_fraction * _ffn_per_token(cfg, "image", tp, B, h, ffn_input))
    else:
        ffn = _ffn_per_token(cfg, "shared", tp, B, h, ffn_input)
    terms = {
        "norms_and_residual": tokens * (3 * h * r * B + 2 * extra_norm),
        "qkv": tokens * ((a + 2 * g) + (a + g) + a) * B,  # fused QKV, rotated Q/K, linear_proj input
        "core": tokens * (a * B + 4 * heads),  # attention output + log-sum-exp
        "ffn": tokens * ffn,
    }
    if cfg.model.hidden_dropout > 0:
        terms["dropout"] = tokens * 2 * h * r
    backend = profile.backend
    if backend == "dense":
        terms["scores"] = 4.0 * b * heads * s * s if profile.device == "gpu" else 4.0 * b * s * s
    elif backend == "te":
        terms["scores"] = 2.0 * b * heads * s * s
    elif backend == "segmented":
        terms["qkv"] += tokens * 2 * g * B
    if cfg.model.attention_dropout > 0 and backend in ("dense", "te"):
        terms["scores"] = terms.get("scores", 0.0) + b * heads * s * s
    return terms


def batch_bytes(cfg: Config, micro_batch: int, latent_fraction: float) -> float:
    """One micro-batch's Batch tensors (BATCH_BYTES_PER_POSITION)."""
    per_latent = 12 * cfg.model.patch_dim + 8
    return cfg.data.seq_length * micro_batch * (BATCH_BYTES_PER_POSITION + latent_fraction * per_latent)


def microbatch_terms(cfg: Config, profile: Profile, micro_batch: int) -> Dict[str, float]:
    """Per micro-batch in flight, outside the layers: the layout's cached indices and the backend's mask."""
    s, b = cfg.data.seq_length, micro_batch
    terms = {"layout": float(LAYOUT_BYTES_PER_POSITION * s * b)}
    if profile.backend in ("dense", "te"):
        terms["mask"] = float(b * s * s) * (2 if profile.backend == "te" else 1)
    elif profile.backend == "flex":
        blocks = -(-s // BLOCK)
        terms["mask"] = float(4 * 4 * b * blocks * blocks)
    return terms


def embedding_terms(cfg: Config, profile: Profile, micro_batch: int, latent_fraction: float) -> Dict[str, float]:
    """First stage: token ids, the patch embedding's input and the timestep MLP of the latent rows."""
    m = cfg.model
    tokens = cfg.data.seq_length * micro_batch
    latent = tokens * latent_fraction * (m.patch_dim + m.timestep_embed_dim + 3 * m.hidden_size) * profile.act_bytes
    return {"embedding": 8.0 * tokens + latent}


def head_terms(cfg: Config, profile: Profile, tp: int, sequence_parallel: bool, micro_batch: int,
               latent_fraction: float) -> Dict[str, float]:
    """Last stage: final norm, LM head input, velocity head rows (all kept for the backward)."""
    h, B = cfg.model.hidden_size, profile.act_bytes
    r = 1.0 / tp if sequence_parallel else 1.0
    tokens = cfg.data.seq_length * micro_batch
    extra_norm = h * r * B if profile.device == "cpu" else 0.0
    return {"heads": tokens * (2 * h * r * B + extra_norm + latent_fraction * h * B)}


def logits_bytes(cfg: Config, profile: Profile, tp: int, padded_vocab: int, micro_batch: int) -> float:
    """The LM head's [s, b, V/tp] logits in the activation dtype plus the fp32 copy the vocab-parallel
    cross-entropy works in (and keeps as the softmax for the backward); an fp32 model clones them."""
    return float(cfg.data.seq_length * micro_batch * (padded_vocab // tp) * (profile.act_bytes + 4))
