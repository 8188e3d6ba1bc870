"""Load a trained checkpoint for generation: `load_for_generation(path, ...) -> Generator`.

    gen = load_for_generation("runs/demo")                  # a run folder, a checkpoint root or an iter_* folder
    engine, tokenizer, encoder = gen.engine, gen.tokenizer, gen.encoder

What it does, in order, failing before any compute with an error that names the folder or file:
  1. find the checkpoint: `<run>/checkpoints` or the root itself -> `latest` or the newest complete iter_*;
     an iter_* folder without its completion marker (a partial save) or without config.yaml is refused;
  2. read the run's resolved config.yaml and re-lay it out for generation: tensor parallelism = the number of
     processes (1 for a plain `python`, N under torchrun), no pipeline / expert / sequence parallelism (every
     expert lives on every rank), the requested precision and device, implementations re-resolved for this
     machine (a checkpoint trained with Transformer Engine loads into megatron's local layers: same names);
  3. initialise megatron's parallel state (megafusion.parallel.initialize) and build the model;
  4. load the weights through megatron dist_checkpointing, which reshards whatever TP / PP / EP layout saved them;
  5. open the tokenizer and the frozen encoder named by the training data's manifest.json (or the given
     overrides, or for a checkpoint converted from Hugging Face format its root's encoder.json) and check the
     encoder's latent shape and the patch size against the model.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from megafusion.checkpoint import publish
from megafusion.config import load_config
from megafusion.config.schema import Config

logger = logging.getLogger("megafusion.generate")

PRECISIONS = ("auto", "fp32", "bf16")
ENCODER_FILE = "encoder.json"  # beside a checkpoint converted from Hugging Face format (megafusion/hf/importer.py)


class CheckpointNotFoundError(FileNotFoundError):
    """No complete checkpoint where one was asked for."""


@dataclass
class Generator:
    cfg: Config
    """The checkpoint's config, laid out for generation."""
    model: torch.nn.Module
    engine: object
    """megafusion.inference.engine.Engine over the model."""
    tokenizer: Optional[object]
    """megafusion.preprocess.tokenization.TextTokenizer, or None when no tokenizer is known."""
    encoder: Optional[object]
    """The frozen encoder (megafusion.encoders) that made the training latents, or None."""
    manifest: Optional[dict]
    checkpoint: Path
    step: int
    device: torch.device
    precision: str
    """fp32 or bf16, as resolved for this run."""


def find_checkpoint(path) -> Path:
    """A run folder, a checkpoint root (holding `latest` / iter_*) or an iter_* folder -> a complete iter_* folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"--checkpoint {path}: no such folder")
    if publish.is_complete(path):
        found = path
    elif path.name.startswith(publish.ITER_PREFIX):
        raise CheckpointNotFoundError(
            f"--checkpoint {path} is a partial checkpoint: it has no {publish.COMPLETE_MARKER} (the save did not "
            f"finish); use the checkpoint root to pick the newest complete one")
    else:
        roots = [path / "checkpoints", path] if (path / "checkpoints").is_dir() else [path]
        found = next((f for f in (publish.find_latest(r) for r in roots) if f is not None), None)
        if found is None:
            partial = sorted(p.name for r in roots if r.is_dir() for p in r.iterdir()
                             if p.name.startswith(("tmp.", publish.ITER_PREFIX)))
            detail = f" (only partial saves: {', '.join(partial)})" if partial else ""
            raise CheckpointNotFoundError(
                f"--checkpoint {path}: no complete checkpoint under {' or '.join(str(r) for r in roots)}{detail}; "
                f"a complete one is an iter_XXXXXXX folder holding {publish.COMPLETE_MARKER}")
    if not (found / "config.yaml").is_file():
        raise CheckpointNotFoundError(f"checkpoint {found} has no config.yaml (the run's resolved config); it "
                                      f"cannot be rebuilt for generation")
    return found


def generation_config(cfg_path: Path, world_size: int, precision: str, overrides: List[str] = ()) -> Config:
    """The saved config with the parallel layout and precision of this generation run."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {list(PRECISIONS)}")
    layout = [
        f"parallel.tensor_model_parallel_size={world_size}",
        "parallel.pipeline_model_parallel_size=1",
        "parallel.virtual_pipeline_model_parallel_size=null",
        "parallel.expert_model_parallel_size=1",
        "parallel.sequence_parallel=false",
        "model.transformer_impl=auto",
        f"training.precision={precision}",
    ]
    return load_config(str(cfg_path), layout + list(overrides))


def read_manifest(cfg: Config, checkpoint: Path) -> Optional[dict]:
    """manifest.json of the run's first dataset folder (None for runs on generated data)."""
    if not cfg.data.paths:
        return None
    path = Path(cfg.data.paths[0]) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} was trained on {cfg.data.paths[0]}, whose manifest.json is "
                                f"missing; pass --tokenizer and --encoder to generate without it")
    with open(path) as f:
        return json.load(f)


def check_encoder(encoder, cfg: Config, where: str) -> None:
    """The encoder's latent [C, H, W] must be what the model was built for."""
    c, h, w = (int(x) for x in encoder.latent_shape)
    m = cfg.model
    if (c, h, w) != (m.latent_channels, m.latent_size, m.latent_size):
        raise ValueError(f"{where}: the encoder makes latents [{c}, {h}, {w}] but the checkpoint's model expects "
                         f"[{m.latent_channels}, {m.latent_size}, {m.latent_size}] (model.latent_channels / "
                         f"latent_size); use the encoder the model was trained with")


def load_model(folder: Path, cfg: Config, device: Optional[str] = None):
    """Initialise megatron's parallel state for `cfg` (generation_config's layout), build the model on `device`
    (default: the parallel state's), load the weights of `folder` and switch to eval: (model, step, device)."""
    from megafusion.checkpoint.checkpointer import load_checkpoint
    from megafusion.model import model_provider
    from megafusion.parallel.initialize import initialize_parallel

    info = initialize_parallel(cfg.parallel, cfg.training.seed)
    target = torch.device(device) if device else info.device
    model = model_provider(cfg)
    model.to(target)
    loaded = load_checkpoint(folder, [model], optimizer=None)
    model.eval()
    return model, int(loaded.train_state.step), target


def load_for_generation(checkpoint, *, precision: str = "auto", device: Optional[str] = None,
                        tokenizer: Optional[str] = None, encoder: Optional[str] = None,
                        encoder_config: Optional[dict] = None, overrides: List[str] = (),
                        use_cache: bool = True) -> Generator:
    """Build the model of `checkpoint`, load its weights and open its tokenizer and encoder (module docstring)."""
    from megafusion.encoders import build_encoder
    from megafusion.inference.engine import Engine
    from megafusion.preprocess.tokenization import TextTokenizer

    folder = find_checkpoint(checkpoint)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = generation_config(folder / "config.yaml", world, precision, overrides)
    manifest = read_manifest(cfg, folder) if (tokenizer is None or encoder is None) else None
    if manifest is not None and int(manifest.get("patch_size", cfg.model.patch_size)) != cfg.model.patch_size:
        raise ValueError(f"{cfg.data.paths[0]}/manifest.json: patch_size {manifest['patch_size']} differs from the "
                         f"checkpoint's model.patch_size {cfg.model.patch_size}")
    tok_path = tokenizer or cfg.data.tokenizer_model or ((manifest or {}).get("tokenizer") or {}).get("path")
    text_tokenizer = TextTokenizer(tok_path) if tok_path else None
    if text_tokenizer is not None and text_tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {text_tokenizer.vocab_size} pieces but the model's vocabulary is "
                         f"{cfg.model.vocab_size} (model.vocab_size); use the tokenizer the model was trained with")
    frozen = None
    if encoder is not None:
        frozen = build_encoder(encoder, **(encoder_config or {}))
        check_encoder(frozen, cfg, f"--encoder {encoder}")
    elif manifest is not None:
        frozen = build_encoder(manifest["encoder"]["name"], **manifest["encoder"].get("config", {}))
        check_encoder(frozen, cfg, f"{cfg.data.paths[0]}/manifest.json")
    elif (folder.parent / ENCODER_FILE).is_file():  # a checkpoint converted from a Hugging Face folder
        spec = json.loads((folder.parent / ENCODER_FILE).read_text())
        frozen = build_encoder(spec["name"], **(spec.get("config") or {}))
        check_encoder(frozen, cfg, str(folder.parent / ENCODER_FILE))

    model, step, target = load_model(folder, cfg, device)
    if frozen is not None and target.type == "cuda":
        frozen.device = str(target)
    engine = Engine(model, vocab_size=cfg.model.vocab_size, context_length=cfg.data.seq_length,
                    conditioning=cfg.objective.captioning, use_cache=use_cache, device=target)
    logger.info("loaded %s (step %d) for generation: tp=%d, %s, %s", folder, step, world,
                "bf16" if model.config.bf16 else "fp32", target)
    return Generator(cfg=cfg, model=model, engine=engine, tokenizer=text_tokenizer, encoder=frozen,
                     manifest=manifest, checkpoint=folder, step=step, device=target,
                     precision="bf16" if model.config.bf16 else "fp32")
