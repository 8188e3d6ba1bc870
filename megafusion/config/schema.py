"""The one config tree of megafusion: model / data / objective / parallel / optimizer / training / checkpoint /
logging.

Plain dataclasses, used as omegaconf structured configs (megafusion.config.loading), so YAML presets and dotlist
overrides are type-checked and unknown keys are errors. Each section validates itself in __post_init__ with a
message naming the field and the fix; cross-section checks live in `Config.__post_init__`. The model section is
turned into megatron's TransformerConfig by megafusion.model.transformer_config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

ATTENTION_BACKENDS = ("auto", "dense", "segmented", "flex", "te")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
MOE_MODALITIES = ("text", "image", "audio")  # audio: the masked-diffusion family's audio-code FFN
MOE_LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOE_DISPATCHERS = ("alltoall", "allgather")
CAPTIONING_RULES = ("transfusion", "bagel")
OBJECTIVE_KINDS = ("flow_matching", "masked_diffusion")
MASK_SCHEDULES = ("linear", "cosine", "polynomial")
PATCH_POSITION_EMBEDDINGS = ("none", "sincos2d")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _choice(section: str, name: str, value, choices) -> None:
    _check(value in choices, f"{section}.{name}={value!r} is not one of {list(choices)}")


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward layers (the model.moe section); field names follow Megatron-LM's --moe-*
    flags. Each modality in `modalities` gets its own experts and router in every layer (megatron's MoELayer in
    that modality's slot of the modality FFN); the other modality keeps its dense FFN."""

    num_experts: Optional[int] = None
    """Routed experts per modality and layer (--num-experts); None or 0 = dense FFNs. Must be divisible by
    parallel.expert_model_parallel_size, which spreads them over ranks."""
    modalities: List[str] = field(default_factory=lambda: ["text", "image"])
    """Modalities whose FFN is an MoE layer: any of text, image (needs model.modality_ffn=true)."""
    router_topk: int = 2
    """Experts each token is routed to (--moe-router-topk), at most num_experts; with 1 the softmax is taken
    before the top-k (--moe-router-pre-softmax, which megatron requires for top-1)."""
    ffn_hidden_size: Optional[int] = None
    """Hidden size of one expert (--moe-ffn-hidden-size); None = the dense FFN width (model.ffn_hidden_size)."""
    router_load_balancing_type: str = "aux_loss"
    """aux_loss (Switch-Transformer load-balancing loss per micro-batch, added to the objective with
    aux_loss_coeff and logged as moe_aux_loss) | seq_aux_loss (DeepSeek-V2/V3: balanced within each sequence,
    averaged over the micro-batch's sequences; the modality's rows then reach the router as the batch's
    sequences) | global_aux_loss (the loss over the token counts of all data-parallel ranks, accumulated over the
    step's micro-batches) | none (--moe-router-load-balancing-type)."""
    aux_loss_coeff: float = 1e-2
    """Weight of the load-balancing loss in the training objective (--moe-aux-loss-coeff)."""
    token_dispatcher_type: str = "alltoall"
    """How tokens reach the experts' ranks (--moe-token-dispatcher-type): alltoall | allgather."""
    grouped_gemm: bool = False
    """One grouped GEMM over a rank's experts (Transformer Engine's TEGroupedMLP, GPU; needs
    model.transformer_impl=transformer_engine); false = megatron's SequentialMLP, one GEMM per expert (CPU too)."""
    shared_expert_intermediate_size: Optional[int] = None
    """Hidden size of the shared expert every token of the modality also runs (--moe-shared-expert-intermediate-size,
    DeepSeek-style; the sum of all shared experts' sizes); None = no shared expert."""
    z_loss_coeff: Optional[float] = None
    """Router z-loss weight (--moe-z-loss-coeff, ST-MoE: keeps router logits small; 1e-3 is a usual start);
    None = off. Logged per modality and layer as moe/<modality>/z_loss."""
    expert_capacity_factor: Optional[float] = None
    """Tokens an expert takes, as a multiple of its even share of the micro-batch's tokens x topk
    (--moe-expert-capacity-factor); tokens beyond it are dropped (counted as moe/<modality>/dropped_tokens).
    None = no capacity (no dropping)."""
    pad_expert_input_to_capacity: bool = False
    """Pad every expert's input to its capacity (--moe-pad-expert-input-to-capacity; needs expert_capacity_factor)."""
    token_drop_policy: str = "probs"
    """Which tokens go when an expert is over capacity (--moe-token-drop-policy): probs (the lowest routing
    probabilities) | position (the latest tokens)."""
    router_dtype: Optional[str] = None
    """Dtype of the router's logits and probabilities (--moe-router-dtype): fp32 | fp64 | None (the model's)."""
    router_score_function: str = "softmax"
    """softmax | sigmoid (--moe-router-score-function; sigmoid scores are renormalised over the top-k)."""
    router_enable_expert_bias: bool = False
    """Aux-loss-free balancing (--moe-router-enable-expert-bias, DeepSeek-V3): a per-expert bias added to the scores
    for the top-k choice only, nudged after each step towards even loads by router_bias_update_rate (megatron's
    finalize_model_grads does it). Needs router_score_function=sigmoid, as megatron requires."""
    router_bias_update_rate: float = 1e-3
    """Step size of the expert-bias update (--moe-router-bias-update-rate)."""

    @property
    def enabled(self) -> bool:
        return bool(self.num_experts)

    def __post_init__(self):
        s = "model.moe"
        _check(self.num_experts is None or self.num_experts >= 0,
               f"{s}.num_experts={self.num_experts} must be >= 0 (0 or null = dense FFNs)")
        modalities = list(self.modalities)
        _check(modalities and len(set(modalities)) == len(modalities) and set(modalities) <= set(MOE_MODALITIES),
               f"{s}.modalities={modalities} must be a non-empty list of distinct names from {list(MOE_MODALITIES)}")
        _check(self.router_topk >= 1, f"{s}.router_topk must be >= 1, got {self.router_topk}")
        if self.enabled:
            _check(self.router_topk <= self.num_experts,
                   f"{s}.router_topk={self.router_topk} exceeds num_experts={self.num_experts}")
        _check(self.ffn_hidden_size is None or self.ffn_hidden_size > 0,
               f"{s}.ffn_hidden_size must be positive or null, got {self.ffn_hidden_size}")
        _choice(s, "router_load_balancing_type", self.router_load_balancing_type, MOE_LOAD_BALANCING)
        _check(self.aux_loss_coeff >= 0, f"{s}.aux_loss_coeff must be >= 0, got {self.aux_loss_coeff}")
        _choice(s, "token_dispatcher_type", self.token_dispatcher_type, MOE_DISPATCHERS)
        _check(self.shared_expert_intermediate_size is None or self.shared_expert_intermediate_size > 0,
               f"{s}.shared_expert_intermediate_size must be positive or null, got "
               f"{self.shared_expert_intermediate_size}")
        _check(self.z_loss_coeff is None or self.z_loss_coeff >= 0,
               f"{s}.z_loss_coeff must be >= 0 or null, got {self.z_loss_coeff}")
        _check(self.expert_capacity_factor is None or self.expert_capacity_factor > 0,
               f"{s}.expert_capacity_factor must be positive or null (no capacity), got {self.expert_capacity_factor}")
        _check(not self.pad_expert_input_to_capacity or self.expert_capacity_factor is not None,
               f"{s}.pad_expert_input_to_capacity=true needs {s}.expert_capacity_factor")
        _choice(s, "token_drop_policy", self.token_drop_policy, ("probs", "position"))
        _check(self.router_dtype in (None, "fp32", "fp64"),
               f"{s}.router_dtype={self.router_dtype!r} is not one of fp32, fp64, null")
        _choice(s, "router_score_function", self.router_score_function, MOE_SCORE_FUNCTIONS)
        _check(not self.router_enable_expert_bias or self.router_score_function == "sigmoid",
               f"{s}.router_enable_expert_bias=true needs {s}.router_score_function=sigmoid (megatron-core's rule)")
        _check(self.router_bias_update_rate > 0,
               f"{s}.router_bias_update_rate must be positive, got {self.router_bias_update_rate}")


@dataclass
class ModelConfig:
    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width d_model."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None = num_attention_heads (multi-head attention)."""
    ffn_hidden_size: Optional[int] = None
    """FFN width; None = 4 * hidden_size (GELU) or the 8/3 * hidden_size rounded to 64 (SwiGLU)."""
    kv_channels: Optional[int] = None
    """Head dimension; None = hidden_size / num_attention_heads."""
    vocab_size: int = 512
    """Tokenizer vocabulary (special tokens included); padded up for tensor parallelism."""
    make_vocab_size_divisible_by: int = 128
    """The padded vocabulary is a multiple of this times the tensor-parallel size (megatron's convention)."""
    normalization: str = "RMSNorm"
    """RMSNorm or LayerNorm."""
    activation: str = "swiglu"
    """swiglu (gated SiLU) or gelu."""
    add_bias_linear: bool = False
    """Biases in the attention and FFN linear layers."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of the norms."""
    hidden_dropout: float = 0.0
    """Dropout after attention and FFN."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (dense backend only)."""
    init_method_std: float = 0.02
    """Std of the normal weight init."""
    rotary_base: int = 10000
    """RoPE base over positions of the packed sequence."""
    share_embeddings_and_output_weights: bool = False
    """Tie the LM head to the token embedding."""
    latent_channels: int = 4
    """Channels C of the frozen encoder's latent."""
    latent_size: int = 16
    """Height = width of one image's (or frame's) latent grid."""
    patch_size: int = 2
    """p: each token is a p x p patch of the latent, patch_dim = C * p * p."""
    modality_ffn: bool = True
    """Separate FFN weights for text and image positions (False: one shared FFN, a plain GPT layer)."""
    modality_attention: bool = False
    """BAGEL's Mixture-of-Transformers: text and image positions also get their own QKV and output projections and
    their own input / post-attention norms; the attention itself runs once over the whole sequence (hybrid mask).
    Not with parallel.sequence_parallel."""
    timestep_embed_dim: int = 256
    """Width of the sinusoidal flow-time features fed to the timestep MLP."""
    patch_position_embedding: str = "none"
    """Where a latent patch sits inside its image: none (only the sequence RoPE, which sees the patches in raster
    order) | sincos2d (DiT's fixed 2D sine-cosine embedding of the patch's row and column, added to the patch
    embedding; no parameters)."""
    attention_backend: str = "auto"
    """dense | segmented | flex | te | auto (flex on GPU, segmented on CPU); te must be chosen explicitly since its
    fused masks only cover text-only batches efficiently."""
    hide_noised_latents: bool = False
    """BAGEL-style: noised latent positions are invisible to every later position outside their block."""
    transformer_impl: str = "auto"
    """local (megatron's torch layers) | transformer_engine | auto (TE when it imports)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts FFNs per modality (off unless model.moe.num_experts is set)."""

    def __post_init__(self):
        s = "model"
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "latent_channels",
                     "latent_size", "patch_size", "timestep_embed_dim"):
            _check(getattr(self, name) > 0, f"{s}.{name} must be positive, got {getattr(self, name)}")
        _check(self.hidden_size % self.num_attention_heads == 0 or self.kv_channels is not None,
               f"{s}.hidden_size={self.hidden_size} is not divisible by num_attention_heads="
               f"{self.num_attention_heads}; set model.kv_channels explicitly")
        groups = self.num_query_groups or self.num_attention_heads
        _check(self.num_attention_heads % groups == 0,
               f"{s}.num_query_groups={groups} must divide num_attention_heads={self.num_attention_heads}")
        _check(self.latent_size % self.patch_size == 0,
               f"{s}.latent_size={self.latent_size} is not divisible by patch_size={self.patch_size}")
        _choice(s, "normalization", self.normalization, ("RMSNorm", "LayerNorm"))
        _choice(s, "patch_position_embedding", self.patch_position_embedding, PATCH_POSITION_EMBEDDINGS)
        _choice(s, "activation", self.activation, ("swiglu", "gelu"))
        _choice(s, "attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _choice(s, "transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        if self.moe.enabled:
            _check(self.modality_ffn, "model.moe.num_experts is set but model.modality_ffn=false: MoE experts are "
                   "per modality; set model.modality_ffn=true")
            _check(not (self.moe.grouped_gemm and self.transformer_impl == "local"),
                   "model.moe.grouped_gemm=true needs model.transformer_impl=transformer_engine (TEGroupedMLP); "
                   "set model.moe.grouped_gemm=false for megatron's SequentialMLP")

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def patches_per_frame(self) -> int:
        return (self.latent_size // self.patch_size) ** 2


@dataclass
class DataConfig:
    seq_length: int = 256
    """Packed sequence length S."""
    paths: List[str] = field(default_factory=list)
    """Preprocessed dataset prefixes (folders holding manifest.json); empty = generated synthetic data."""
    weights: List[float] = field(default_factory=list)
    """Blend weights, one per path (empty = proportional to size)."""
    valid_fraction: float = 0.02
    """Fraction of documents held out for validation."""
    num_workers: int = 2
    """Background loader processes (each plans and builds every num_workers-th micro-batch); 0 = in-process."""
    seed: int = 1234
    """Seed of the data order."""
    tokenizer_model: Optional[str] = None
    """SentencePiece .model (only for generation from text prompts)."""

    def __post_init__(self):
        _check(self.seq_length > 0, f"data.seq_length must be positive, got {self.seq_length}")
        _check(not self.weights or len(self.weights) == len(self.paths),
               f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}")
        _check(all(w >= 0 for w in self.weights), "data.weights must be non-negative")
        _check(0.0 <= self.valid_fraction < 1.0, f"data.valid_fraction={self.valid_fraction} must be in [0, 1)")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")


@dataclass
class MaskScheduleConfig:
    """Masking probability beta(t) of one modality (megafusion/objectives/masked_diffusion.py)."""
    kind: str = "linear"
    """linear: t; cosine: sin(pi t / 2) (MaskGIT's cosine: more masked at a given t); polynomial: t^exponent (the
    tri-modal paper finds polynomial best)."""
    exponent: float = 1.0
    """polynomial only: the exponent a > 0 (a > 1 masks less at a given t)."""
    weighting: str = "elbo"
    """elbo: a masked position's CE weighs beta'(t) / beta(t) (1/t for linear: the unbiased ELBO); none: weight 1,
    MaskGIT's mask-prediction loss, which gives heavily masked states (generation's first steps) more weight than
    the ELBO does; the loss is then no longer a likelihood bound."""

    def __post_init__(self):
        _choice("objective.masked_diffusion.*_schedule", "kind", self.kind, MASK_SCHEDULES)
        _choice("objective.masked_diffusion.*_schedule", "weighting", self.weighting, ("elbo", "none"))
        _check(self.exponent > 0, f"objective.masked_diffusion.*_schedule.exponent={self.exponent} must be > 0")


@dataclass
class MaskedDiffusionConfig:
    """objective.kind = masked_diffusion: the unified vocabulary and the forward process (docs/masked_diffusion.md)."""
    text_vocab_size: int = 0
    """Size of the text tokenizer's vocabulary (ids [0, text_vocab_size)); the dataset manifest must agree."""
    image_codebook_size: int = 0
    """Entries of the image tokenizer's codebook (0 = no image codes)."""
    audio_codebook_size: int = 0
    """Entries of the audio tokenizer's codebook (0 = no audio codes)."""
    tasks: List[str] = field(default_factory=lambda: ["text", "image_text", "audio_text"])
    """Task tokens, in id order (megafusion/discrete/vocab.py)."""
    text_schedule: MaskScheduleConfig = field(default_factory=MaskScheduleConfig)
    image_schedule: MaskScheduleConfig = field(default_factory=MaskScheduleConfig)
    audio_schedule: MaskScheduleConfig = field(default_factory=MaskScheduleConfig)
    t_floor: float = 1e-3
    """Lower bound on t for the masking probability and the 1/t-type weight (bounds the weight at 1/t_floor)."""
    clean_text_fraction: float = 0.0
    """Probability that a row holding image or audio codes keeps its text unmasked (only the media masked and in
    the loss): trains generation of media from a clean prompt (docs/masked_diffusion.md, "Conditioning rows")."""
    clean_media_fraction: float = 0.0
    """Probability that such a row keeps its image / audio codes unmasked instead (text given media)."""
    anti_masking: bool = False
    """Also train on the complementary mask of every row (u > 1 - beta(t)), averaging both losses: lower variance
    at twice the forward cost; a micro-batch then runs 2 * training.micro_batch_size rows."""

    def __post_init__(self):
        s = "objective.masked_diffusion"
        _check(self.text_vocab_size >= 0 and self.image_codebook_size >= 0 and self.audio_codebook_size >= 0,
               f"{s}: vocabulary sizes must be >= 0")
        _check(0.0 < self.t_floor < 1.0, f"{s}.t_floor={self.t_floor} must be in (0, 1)")
        _check(self.clean_text_fraction >= 0 and self.clean_media_fraction >= 0
               and self.clean_text_fraction + self.clean_media_fraction <= 1.0,
               f"{s}.clean_text_fraction + clean_media_fraction must lie in [0, 1]")


@dataclass
class ObjectiveConfig:
    kind: str = "flow_matching"
    """flow_matching: the Transfusion family (text CE + velocity flow matching over continuous latents);
    masked_diffusion: tri-modal masked discrete diffusion over a unified vocabulary (objective.masked_diffusion)."""
    masked_diffusion: MaskedDiffusionConfig = field(default_factory=MaskedDiffusionConfig)
    loss_weighting: str = "fixed"
    """fixed: L = ce_weight * L_ce + fm_weight * L_fm; adaptive: EMA-centred weights (docs/objectives.md)."""
    ce_weight: float = 1.0
    """lambda_ce for fixed weighting."""
    fm_weight: float = 1.0
    """lambda_fm for fixed weighting."""
    adaptive_alpha: float = 0.5
    """alpha in (0, 1): importance of CE in the adaptive weighted centre A_k = alpha*L_ce + (1-alpha)*L_fm."""
    adaptive_mu: float = 0.99
    """mu in (0, 1): EMA decay of B_k = mu*B_{k-1} + (1-mu)*A_k."""
    timestep_sampling: str = "uniform"
    """Flow time t per image/frame: uniform on [0, 1] or logit_normal."""
    logit_normal_mean: float = 0.0
    """Mean of the normal before the sigmoid (logit_normal)."""
    logit_normal_std: float = 1.0
    """Std of the normal before the sigmoid (logit_normal)."""
    timestep_shift: float = 1.0
    """Shift s >= 1 moves t towards noise for large latents: t' = t / (t + s * (1 - t)); 1 = no shift."""
    cond_dropout: float = 0.1
    """Probability that an image's text conditioning is dropped (classifier-free guidance training)."""
    captioning: str = "transfusion"
    """How text that follows an image learns to read it (docs/objectives.md, "Captioning"):
    transfusion: a fraction `caption_fraction` of the media items followed by text in their document get flow
    times limited to the cleaner half, t >= caption_min_t (Transfusion's rule; no extra positions); generation
    appends a finished image as a noised block at t = 1.
    bagel: every frame is laid out twice, a noised copy trained with flow matching and a clean copy after it that
    later positions read; the noised copy is invisible outside its block (needs model.hide_noised_latents=true);
    generation appends a clean copy after the positions of the noised one. Costs twice the latent positions."""
    caption_fraction: float = 0.2
    """transfusion captioning: probability that a media item followed by text in its document has its noise
    limited to t >= caption_min_t (the Transfusion paper limits 20% of image-caption pairs)."""
    caption_min_t: float = 0.5
    """transfusion captioning: the lowest flow time of such an item (0.5 = the cleaner half; t = 1 is clean)."""

    def __post_init__(self):
        s = "objective"
        _choice(s, "kind", self.kind, OBJECTIVE_KINDS)
        _choice(s, "loss_weighting", self.loss_weighting, ("fixed", "adaptive"))
        _choice(s, "timestep_sampling", self.timestep_sampling, ("uniform", "logit_normal"))
        _check(0.0 < self.adaptive_alpha < 1.0, f"{s}.adaptive_alpha={self.adaptive_alpha} must be in (0, 1)")
        _check(0.0 < self.adaptive_mu < 1.0, f"{s}.adaptive_mu={self.adaptive_mu} must be in (0, 1)")
        _check(self.ce_weight >= 0 and self.fm_weight >= 0, f"{s}.ce_weight and fm_weight must be >= 0")
        _check(self.timestep_shift >= 1.0, f"{s}.timestep_shift={self.timestep_shift} must be >= 1")
        _check(self.logit_normal_std > 0, f"{s}.logit_normal_std must be positive")
        _check(0.0 <= self.cond_dropout < 1.0, f"{s}.cond_dropout={self.cond_dropout} must be in [0, 1)")
        _choice(s, "captioning", self.captioning, CAPTIONING_RULES)
        _check(0.0 <= self.caption_fraction <= 1.0, f"{s}.caption_fraction={self.caption_fraction} must be in [0, 1]")
        _check(0.0 <= self.caption_min_t < 1.0, f"{s}.caption_min_t={self.caption_min_t} must be in [0, 1)")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """TP degree."""
    pipeline_model_parallel_size: int = 1
    """PP degree."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved virtual stages per pipeline rank."""
    expert_model_parallel_size: int = 1
    """EP degree: each MoE layer's experts are split over this many data-parallel ranks (needs model.moe; must
    divide model.moe.num_experts and the data-parallel size)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: activations outside attention and the FFNs are split along the sequence
    across the TP group (needs TP > 1 and data.seq_length divisible by TP; CPU and GPU, local or TE layers)."""
    distributed_backend: str = "auto"
    """auto (nccl on GPU, gloo on CPU) | nccl | gloo."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks."""
    overlap_grad_reduce: bool = False
    """Overlap gradient all-reduce with backward (GPU)."""
    timeout_minutes: Optional[float] = None
    """How long a rank waits for its peers in a collective (and at the rendezvous) before it fails: the bound on
    the time a rank whose peer died or froze can hang. null: 5 on gloo (CPU), 10 on NCCL (with NCCL's async error
    handling, whose watchdog aborts the process). Raise it when a rank legitimately waits longer (a slow shared
    file system at a checkpoint save)."""

    def __post_init__(self):
        s = "parallel"
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
            _check(getattr(self, name) >= 1, f"{s}.{name} must be >= 1")
        _choice(s, "distributed_backend", self.distributed_backend, ("auto", "nccl", "gloo"))
        _check(self.timeout_minutes is None or self.timeout_minutes > 0,
               f"{s}.timeout_minutes={self.timeout_minutes} must be > 0 (or null for the backend's default)")


PARAM_GROUPS = ("embedding", "unembedding", "attention", "mlp", "norm")


@dataclass
class ParamGroupConfig:
    """AdamW settings of one kind of parameter (optimizer.groups.<kind>); None = the optimizer's own value."""

    lr_mult: float = 1.0
    """Multiplies the whole learning-rate schedule (peak and min_lr) of these parameters."""
    weight_decay: Optional[float] = None
    """Decoupled weight decay of these parameters (the decay_norms_and_biases / decay_embeddings switches still
    exempt norms, biases and embeddings); needs optimizer.weight_decay > 0, which megatron's schedule scales."""
    eps: Optional[float] = None
    """Adam epsilon of these parameters."""

    def check(self, where: str) -> None:
        _check(self.lr_mult > 0, f"{where}.lr_mult must be positive, got {self.lr_mult}")
        _check(self.weight_decay is None or self.weight_decay >= 0, f"{where}.weight_decay must be >= 0 or null")
        _check(self.eps is None or self.eps > 0, f"{where}.eps must be positive or null")


@dataclass
class ParamGroupsConfig:
    """Per-module AdamW hyperparameters (optimizer.groups), for both model families: the tri-modal masked-diffusion
    paper finds embeddings want larger learning rates and later blocks smaller updates."""

    embedding: ParamGroupConfig = field(default_factory=ParamGroupConfig)
    """Input embeddings: the token embedding (and a tied LM head), the patch and timestep embeddings."""
    unembedding: ParamGroupConfig = field(default_factory=ParamGroupConfig)
    """Output heads: an untied LM head and the velocity head."""
    attention: ParamGroupConfig = field(default_factory=ParamGroupConfig)
    """Attention projections (QKV and output, per-modality ones too), weights and biases."""
    mlp: ParamGroupConfig = field(default_factory=ParamGroupConfig)
    """Feed-forward layers: dense, per-modality and MoE (experts and routers), weights and biases."""
    norm: ParamGroupConfig = field(default_factory=ParamGroupConfig)
    """Norm weights and biases, including the final norm."""
    depth_lr_decay: float = 1.0
    """Learning-rate factor across depth: transformer layer l of L (0-based) gets lr x depth_lr_decay^(l / (L-1))
    on top of its group's lr_mult, so the first layer keeps the group's rate and the last gets depth_lr_decay
    times it (< 1: later blocks take smaller updates). Embeddings and heads are not scaled."""

    def __post_init__(self):
        for name in PARAM_GROUPS:
            getattr(self, name).check(f"optimizer.groups.{name}")
        _check(self.depth_lr_decay > 0, f"optimizer.groups.depth_lr_decay must be positive, got {self.depth_lr_decay}")

    @property
    def default(self) -> bool:
        return self.depth_lr_decay == 1.0 and all(getattr(self, n) == ParamGroupConfig() for n in PARAM_GROUPS)


@dataclass
class SdeRescaleConfig:
    """Physical vs logical batch size (optimizer.sde_rescale; training/batch_rescale.py): the optimizer's values
    are the ones tuned at `logical_batch_size` and `base_tokens`, and are moved to this run's global batch and token
    horizon by kappa = (base_tokens / tokens)^gamma * (global_batch / logical_batch): lr x sqrt(kappa),
    betas ^ kappa, eps / sqrt(kappa) (the tri-modal masked-diffusion paper's SDE rule, marked unconfirmed)."""

    logical_batch_size: Optional[int] = None
    """Global batch (sequences) the hyperparameters were tuned at; None = no rescaling."""
    base_tokens: Optional[float] = None
    """Token horizon of the tuning run; None = this run's (the horizon factor is then 1)."""
    gamma: float = 0.44
    """Exponent of the horizon factor."""
    critical_steps: Optional[float] = None
    """S_crit: the rule holds only for a global batch below D / (data.seq_length * S_crit) sequences (D = this run's
    tokens); a larger one is refused. None = not checked."""

    def __post_init__(self):
        s = "optimizer.sde_rescale"
        _check(self.logical_batch_size is None or self.logical_batch_size > 0,
               f"{s}.logical_batch_size must be positive or null")
        _check(self.base_tokens is None or self.base_tokens > 0, f"{s}.base_tokens must be positive or null")
        _check(self.gamma >= 0, f"{s}.gamma must be >= 0")
        _check(self.critical_steps is None or self.critical_steps > 0, f"{s}.critical_steps must be positive or null")


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    """Peak learning rate after warmup."""
    min_lr: float = 1.5e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 1000
    """Linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    decay_norms_and_biases: bool = False
    """Apply weight decay to norm weights and biases."""
    decay_embeddings: bool = False
    """Apply weight decay to embeddings."""
    groups: ParamGroupsConfig = field(default_factory=ParamGroupsConfig)
    """Per-module learning-rate multipliers, weight decay and epsilon, and a depth factor (training/optimizer.py)."""
    sde_rescale: SdeRescaleConfig = field(default_factory=SdeRescaleConfig)
    """Move hyperparameters tuned at a logical batch to the physical one (training/batch_rescale.py)."""

    def __post_init__(self):
        s = "optimizer"
        for name in PARAM_GROUPS:
            _check(getattr(self.groups, name).weight_decay is None or self.weight_decay > 0,
                   f"{s}.groups.{name}.weight_decay needs {s}.weight_decay > 0 (megatron's schedule scales the "
                   f"optimizer's decay per group)")
        _check(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"{s}: need 0 <= min_lr <= lr and lr > 0")
        _check(self.warmup_steps >= 0, f"{s}.warmup_steps must be >= 0")
        _check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, f"{s}.adam_beta1/2 must be in [0, 1)")
        _check(self.clip_grad >= 0, f"{s}.clip_grad must be >= 0")


@dataclass
class TrainingConfig:
    micro_batch_size: int = 2
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 4
    """Sequences per optimizer step over all data-parallel ranks."""
    train_steps: Optional[int] = 20
    """Optimizer steps; None = derived from flops_budget."""
    flops_budget: Optional[float] = None
    """Total training FLOPs; with train_steps None, steps = budget / FLOPs per step."""
    seed: int = 1234
    """Seed of weights, noise and dropout."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16."""
    recompute: str = "none"
    """Activation recompute: none | selective (core attention) | full."""
    nan_policy: str = "halt"
    """On NaN/Inf loss or gradients: skip the step or halt."""
    exit_interval: Optional[int] = None
    """Save a checkpoint and exit (status 0) after a step divisible by this: a planned, resumable stop."""
    exit_duration_minutes: Optional[float] = None
    """Save a checkpoint and exit (status 0) after the first step that ends this many minutes after training
    started (Megatron-LM's --exit-duration-in-mins): a wall-clock budget, e.g. within a cluster job's time
    limit. All ranks stop at the same step."""
    eval_interval: int = 0
    """Validation every N steps (0 = off)."""
    eval_steps: int = 2
    """Micro-batches per validation."""
    run_dir: str = "runs/default"
    """Where metrics, TensorBoard events and the resolved config go."""

    def __post_init__(self):
        s = "training"
        _check(self.micro_batch_size >= 1, f"{s}.micro_batch_size must be >= 1")
        _check(self.global_batch_size % self.micro_batch_size == 0,
               f"{s}.global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size="
               f"{self.micro_batch_size}")
        _check(self.train_steps is not None or self.flops_budget is not None,
               f"{s}: set train_steps or flops_budget")
        _check(self.train_steps is None or self.train_steps >= 0, f"{s}.train_steps must be >= 0")
        _check(self.exit_interval is None or self.exit_interval >= 1, f"{s}.exit_interval must be >= 1")
        _check(self.exit_duration_minutes is None or self.exit_duration_minutes > 0,
               f"{s}.exit_duration_minutes={self.exit_duration_minutes} must be positive (or null for no limit)")
        _choice(s, "precision", self.precision, ("auto", "fp32", "bf16"))
        _choice(s, "recompute", self.recompute, ("none", "selective", "full"))
        _choice(s, "nan_policy", self.nan_policy, ("skip", "halt"))


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None
    """Checkpoint root (None = <run_dir>/checkpoints)."""
    save_interval: int = 0
    """Save every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Published checkpoints kept; older ones are removed."""
    load: str = "auto"
    """auto (resume from save_dir's latest if any) | none | a checkpoint folder."""
    overwrite: bool = False
    """Allow checkpoint.load=none (a fresh run) into a save_dir that already holds another run's checkpoints; they
    stay until this run's checkpoints replace them (keep_last). Without it such a start is refused."""
    save_at_end: bool = True
    """Save once more when training ends."""
    load_optimizer: bool = True
    """Restore optimizer state on load; false loads model weights only (needed when the saved layout's optimizer
    format cannot be resharded into this run's tp/pp/ep layout; the load fails up front and says so)."""

    def __post_init__(self):
        _check(isinstance(self.load_optimizer, bool), "checkpoint.load_optimizer must be true or false")
        _check(isinstance(self.overwrite, bool), "checkpoint.overwrite must be true or false")
        _check(self.save_interval >= 0, "checkpoint.save_interval must be >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last must be >= 1")


@dataclass
class LoggingConfig:
    log_interval: int = 1
    """Steps between log lines (stdout and <run_dir>/metrics.jsonl)."""
    tensorboard: bool = True
    """Write TensorBoard events to <run_dir>/tb."""
    peak_flops: Optional[float] = None
    """Per-device peak FLOP/s for MFU; None = H100 bf16 dense on GPU, a GEMM measured at start-up on CPU."""
    wandb_project: Optional[str] = None
    """Weights & Biases project (Megatron-LM's --wandb-project): rank 0 logs the metrics.jsonl scalars there, with
    the resolved config as the run's config; None = no W&B. Needs `pip install megafusion[wandb]`; WANDB_MODE=offline
    writes the run under <run_dir>/wandb for a later `wandb sync`."""
    wandb_run_name: Optional[str] = None
    """W&B run name (--wandb-exp-name); None = the run folder's name. A resumed run continues the same W&B run (its
    id is kept in <run_dir>/wandb_run_id)."""
    wandb_entity: Optional[str] = None
    """W&B entity, a user or team (--wandb-entity); None = the API key's default entity."""

    def __post_init__(self):
        _check(self.log_interval >= 1, "logging.log_interval must be >= 1")
        for name in ("wandb_project", "wandb_run_name", "wandb_entity"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value.strip() != ""),
                   f"logging.{name}={value!r} must be a non-empty name or null")
        for name in ("wandb_run_name", "wandb_entity"):
            _check(getattr(self, name) is None or self.wandb_project is not None,
                   f"logging.{name} is set but logging.wandb_project is not: set logging.wandb_project=NAME to log "
                   f"to W&B (or drop logging.{name})")
        _check(self.wandb_project is None or "/" not in self.wandb_project,
               f"logging.wandb_project={self.wandb_project!r} must not contain '/': put the team in "
               f"logging.wandb_entity")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        m, p = self.model, self.parallel
        tp = p.tensor_model_parallel_size
        _check(m.num_attention_heads % tp == 0,
               f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
               f"parallel.tensor_model_parallel_size={tp}")
        groups = m.num_query_groups or m.num_attention_heads
        _check(groups % tp == 0, f"model.num_query_groups={groups} is not divisible by tensor_model_parallel_size={tp}")
        _check(m.num_layers % p.pipeline_model_parallel_size == 0,
               f"model.num_layers={m.num_layers} is not divisible by pipeline_model_parallel_size="
               f"{p.pipeline_model_parallel_size}")
        if p.sequence_parallel:
            _check(tp > 1, "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
            _check(not m.modality_attention, "model.modality_attention=true does not support "
                   "parallel.sequence_parallel yet (a rank's slice of the sequence holds a different number of each "
                   "modality's positions than its peers'); set parallel.sequence_parallel=false")
            _check(self.data.seq_length % tp == 0,
                   f"parallel.sequence_parallel=true splits the sequence over TP: data.seq_length="
                   f"{self.data.seq_length} must be divisible by tensor_model_parallel_size={tp}")
        self._check_moe()
        if self.objective.kind == "masked_diffusion":
            self._check_masked_diffusion()
            return
        if self.objective.captioning == "bagel":
            _check(m.hide_noised_latents, "objective.captioning=bagel needs model.hide_noised_latents=true (the "
                   "noised copy of each frame must be invisible to later positions); set it, or use "
                   "objective.captioning=transfusion")
        copies = 2 if self.objective.captioning == "bagel" else 1
        frame = copies * m.patches_per_frame + 2  # BOI + patches (+ the clean copy) + EOI
        _check(frame <= self.data.seq_length,
               f"one image needs {frame} positions (model.latent_size/patch_size squared + BOI/EOI) but "
               f"data.seq_length={self.data.seq_length}; raise data.seq_length or model.patch_size")

    def _check_masked_diffusion(self):
        md, m = self.objective.masked_diffusion, self.model
        _check(md.text_vocab_size > 0, "objective.kind=masked_diffusion needs objective.masked_diffusion."
               "text_vocab_size (the text tokenizer's vocabulary size; the dataset manifest names it)")
        from megafusion.discrete.vocab import UnifiedVocab

        size = UnifiedVocab(md.text_vocab_size, md.image_codebook_size, md.audio_codebook_size, tuple(md.tasks)).size
        _check(m.vocab_size == size, f"objective.kind=masked_diffusion: model.vocab_size={m.vocab_size} must equal "
               f"the unified vocabulary's size {size} (text {md.text_vocab_size} + image codes "
               f"{md.image_codebook_size} + audio codes {md.audio_codebook_size} + specials and tasks); set "
               f"model.vocab_size={size}")
        _check(not m.modality_attention, "objective.kind=masked_diffusion supports modality FFNs "
               "(model.modality_ffn: text, image codes, audio codes) but not per-modality attention; set "
               "model.modality_attention=false")
        _check(self.objective.loss_weighting == "fixed", "objective.kind=masked_diffusion has one loss term; set "
               "objective.loss_weighting=fixed")

    def _check_moe(self):
        moe, ep, tp = self.model.moe, self.parallel.expert_model_parallel_size, self.parallel.tensor_model_parallel_size
        if not moe.enabled:
            _check(ep == 1, f"parallel.expert_model_parallel_size={ep} needs MoE layers: set model.moe.num_experts "
                   f"(a multiple of {ep})")
            return
        _check(moe.num_experts % ep == 0, f"model.moe.num_experts={moe.num_experts} is not divisible by "
               f"parallel.expert_model_parallel_size={ep}")
        _check("audio" not in moe.modalities or self.objective.kind == "masked_diffusion",
               "model.moe.modalities names audio, whose FFN exists only in the masked-diffusion family "
               "(objective.kind=masked_diffusion); remove it")
        # megatron-core: biases of TP-sharded experts (expert tensor parallel size = TP) are not supported
        _check(tp == 1 or not self.model.add_bias_linear,
               f"model.moe with parallel.tensor_model_parallel_size={tp} and model.add_bias_linear=true: megatron-core "
               "supports expert biases only without expert tensor parallelism; set model.add_bias_linear=false")
