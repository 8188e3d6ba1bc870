"""`megafusion generate --hf HF_DIR`: the generation pipeline over the transformers model of an exported folder.

The engine (megafusion/inference) talks to a small model interface, which MultimodalModel implements and
HFBackend implements here over the plain-PyTorch transformers model:

    model.config                      patch_dim, latent_size, patch_size, hide_noised_latents
    model.parameters()                (the device is taken from them)
    model(batch, layout=None, inference_context=None) -> ModelOutput(logits [s, b, V] | [1, b, V] | None,
                                                                      velocity [N, patch_dim])

With an `inference_context` (megafusion.inference.kv_cache.InferenceStep) the batch holds only the new positions:
HFBackend passes their RoPE positions as position_ids and the cache as the model's `attention_hook` (the model
calls it with each layer's q, k, v after RoPE, as megatron's attention calls the step through the layout), and
asks for logits only where the step wants them. So the KV-cached pipeline, CFG batching and captioning rules are
the same code for both backends.

`load_hf_for_generation(hf_dir, ...)` returns the same Generator as `load_for_generation`: the model wrapped for
the engine, the tokenizer (tokenizer.model in the folder) and the frozen encoder named in config.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from megafusion.hf import folder as hf_folder

logger = logging.getLogger("megafusion.generate")


class HFBackend(torch.nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        c = hf_model.config
        self.config = SimpleNamespace(patch_dim=c.latent_channels * c.patch_size ** 2, latent_size=c.latent_size,
                                      patch_size=c.patch_size, hide_noised_latents=bool(c.hide_noised_latents))

    def forward(self, batch, layout=None, inference_context=None):
        from megafusion.model.attention.dense import dense_attention
        from megafusion.model.attention.layout import AttentionLayout
        from megafusion.model.output import ModelOutput

        if layout is None:
            layout = AttentionLayout.from_batch(batch, self.config.hide_noised_latents)
        kwargs = {}
        step = inference_context
        if step is not None:
            layout.inference = step

            def hook(layer_number, q, k, v, scale):
                return step.attention(layer_number, q, k, v, layout, scale, dense_attention)

            kwargs = dict(position_ids=step.positions.to(batch.tokens.device), attention_hook=hook)
            wanted = step.logit_positions
            kwargs["logit_positions"] = (wanted if wanted is not None
                                         else torch.zeros(batch.tokens.shape[0], dtype=torch.long)).to(
                                             batch.tokens.device)
        out = self.hf(input_ids=batch.tokens, modality=batch.modality, block_ids=batch.block_ids,
                      document_ids=batch.document_ids, context_start=batch.context_start, noised=batch.noised,
                      latents=batch.noisy_latents, latent_t=batch.latent_t, **kwargs)
        logits = out.logits.transpose(0, 1)  # [b, s, V] -> megafusion's [s, b, V]
        if step is not None and step.logit_positions is None:
            logits = None
        return ModelOutput(logits=logits, velocity=out.velocity)


def load_hf_model(hf_dir, precision: str = "fp32", device: Optional[str] = None):
    """The transformers model of `hf_dir` through AutoModel (megafusion's registration, no remote code run)."""
    from transformers import AutoModel

    from megafusion.hf import register

    register()
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision {precision!r} is not one of auto, fp32, bf16")
    target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = precision == "bf16" or (precision == "auto" and target.type == "cuda")
    model = AutoModel.from_pretrained(str(hf_dir), dtype=torch.bfloat16 if bf16 else torch.float32)
    return model.to(target).eval(), target, "bf16" if bf16 else "fp32"


def load_hf_for_generation(hf_dir, *, precision: str = "auto", device: Optional[str] = None,
                           tokenizer: Optional[str] = None, encoder: Optional[str] = None,
                           encoder_config: Optional[dict] = None, use_cache: bool = True):
    """A megafusion.inference.loading.Generator over the exported folder `hf_dir`."""
    from megafusion.config import load_config
    from megafusion.encoders import build_encoder
    from megafusion.hf.adapter import model_overrides_from_hf
    from megafusion.inference.engine import Engine
    from megafusion.inference.loading import Generator, check_encoder
    from megafusion.preprocess.tokenization import TextTokenizer

    path = Path(hf_dir)
    folder = hf_folder.HFFolder(path)  # refuses a folder without config.json or with missing shards
    model, target, resolved = load_hf_model(path, precision, device)
    c = model.config
    gen_path = path / hf_folder.GENERATION_CONFIG
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    cfg = load_config(None, list(model_overrides_from_hf(c)) + [f"data.seq_length={int(gen.get('max_length', 2048))}",
                                                                   f"objective.captioning={gen.get('captioning', 'transfusion')}"])
    tok_path = tokenizer or (str(path / hf_folder.TOKENIZER_FILE) if (path / hf_folder.TOKENIZER_FILE).is_file()
                             else None)
    text_tokenizer = TextTokenizer(tok_path) if tok_path else None
    if text_tokenizer is not None and text_tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {text_tokenizer.vocab_size} pieces but {path}/config.json's "
                         f"vocabulary is {cfg.model.vocab_size}; use the tokenizer the model was trained with")
    frozen = None
    spec = {"name": encoder, "config": encoder_config or {}} if encoder else getattr(c, "encoder", None)
    if spec:
        frozen = build_encoder(spec["name"], **(spec.get("config") or {}))
        check_encoder(frozen, cfg, f"{path}/config.json encoder" if not encoder else f"--encoder {encoder}")
        if target.type == "cuda":
            frozen.device = str(target)
    backend = HFBackend(model)
    engine = Engine(backend, vocab_size=cfg.model.vocab_size, context_length=cfg.data.seq_length,
                    conditioning=cfg.objective.captioning, use_cache=use_cache, device=target)
    step = int((getattr(c, "megafusion_source", None) or {}).get("step", 0))
    logger.info("loaded %s for generation (transformers model): %s, %s", path, resolved, target)
    return Generator(cfg=cfg, model=backend, engine=engine, tokenizer=text_tokenizer, encoder=frozen,
                     manifest=None, checkpoint=path, step=step, device=target, precision=resolved)


def recommended_settings(hf_dir) -> dict:
    """generation_config.json's solver settings as GenerationConfig field values (steps, cfg_scale, ...)."""
    path = Path(hf_dir) / hf_folder.GENERATION_CONFIG
    if not path.is_file():
        return {}
    gen = json.loads(path.read_text())
    names = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "timestep_shift": "timestep_shift",
             "solver": "solver", "cfg_interval": "cfg_interval"}
    return {ours: gen[theirs] for theirs, ours in names.items() if theirs in gen}
