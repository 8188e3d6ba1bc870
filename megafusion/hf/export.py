"""megafusion checkpoint -> Hugging Face folder (`tools/convert_checkpoint.py to-hf`).

    report = to_hf("runs/x/checkpoints", "hf/x", dtype="bf16", max_shard_size="5GB")

1. find the checkpoint (a run folder, a checkpoint root or an iter_* folder; a partial save is refused) and rebuild
   its model in this one process at TP = PP = EP = 1: megatron dist_checkpointing reshards whatever TP / PP / EP
   layout saved it, so every layout converts to the same folder;
2. plan the shards from the adapter's tensor names and sizes (megafusion/hf/adapter.py: megatron names -> the
   Hugging Face decoder names, fused QKV and gated fc1 split), then write them one shard at a time: only one
   shard's tensors exist besides the model (peak ~ one model copy + one shard; reported);
3. write config.json (the model, the frozen encoder's kind and config, auto_map to the remote code), the remote
   code itself (configuration_megafusion.py, modeling_megafusion.py: plain PyTorch, no megafusion needed),
   generation_config.json (solver steps, guidance scale, timestep shift, context length, special-token ids) and
   the tokenizer (tokenizer.model + the files transformers' LlamaTokenizer reads);
4. publish: everything is written under a temporary sibling name, fsynced, and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from megafusion.hf import folder as hf_folder

logger = logging.getLogger("megafusion.convert")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REMOTE_CODE = ("configuration_megafusion.py", "modeling_megafusion.py")


@dataclass
class ConversionReport:
    out: Path
    tensors: int
    files: List[str]
    weight_bytes: int
    """Bytes of the weights as written (at the output dtype)."""
    model_bytes: int
    """Bytes of the model held in memory while converting."""
    baseline_rss: int
    """Peak resident memory before any weight was loaded (the interpreter, torch, megatron-core)."""
    peak_rss: int
    seconds: float

    def summary(self) -> str:
        extra = self.peak_rss - self.baseline_rss
        return (f"wrote {self.out}: {self.tensors} tensors, {hf_folder.describe_bytes(self.weight_bytes)} in "
                f"{len(self.files)} file(s); peak memory {hf_folder.describe_bytes(self.peak_rss)} "
                f"({hf_folder.describe_bytes(extra)} above the {hf_folder.describe_bytes(self.baseline_rss)} before "
                f"loading, model {hf_folder.describe_bytes(self.model_bytes)}); {self.seconds:.1f} s")


def build_uninitialized(cfg):
    """The model of `cfg` with its parameters allocated but not initialised (every one is about to be loaded):
    megatron's CPU initialisation builds each weight's full master copy first, which would double the peak."""
    from megafusion.model import model_provider
    from megafusion.model.transformer_config import build_transformer_config

    config = build_transformer_config(cfg)
    config.perform_initialization = False
    return model_provider(config)


def load_single_process(checkpoint) -> tuple:
    """(cfg laid out for one process, the model with the checkpoint's weights, step, checkpoint folder)."""
    from megafusion.checkpoint.checkpointer import load_checkpoint
    from megafusion.inference.loading import find_checkpoint, generation_config
    from megafusion.parallel.initialize import destroy_parallel, initialize_parallel

    folder = find_checkpoint(checkpoint)
    cfg = generation_config(folder / "config.yaml", 1, "fp32", ["model.transformer_impl=local"])
    if cfg.objective.kind != "flow_matching":
        raise ValueError(f"{folder}: a {cfg.objective.kind} checkpoint; the Hugging Face format covers the "
                         f"flow-matching family only (docs/hf.md)")
    initialize_parallel(cfg.parallel, cfg.training.seed)
    try:
        model = build_uninitialized(cfg)
        loaded = load_checkpoint(folder, [model], optimizer=None)
    finally:
        destroy_parallel()
    return cfg, model.eval(), int(loaded.train_state.step), folder


def _assets(cfg, folder: Path, tokenizer: Optional[str], encoder: Optional[dict]):
    """(SentencePiece model path or None, {"name", "config"} of the frozen encoder or None)."""
    from megafusion.inference.loading import read_manifest

    manifest = None
    if (tokenizer is None or encoder is None) and cfg.data.paths:
        manifest = read_manifest(cfg, folder)
    tok = tokenizer or cfg.data.tokenizer_model or ((manifest or {}).get("tokenizer") or {}).get("path")
    enc = encoder or ((manifest or {}).get("encoder"))
    return tok, ({"name": enc["name"], "config": dict(enc.get("config") or {})} if enc else None)


def write_generation_config(out: Path, cfg, hf_config) -> None:
    from transformers import GenerationConfig

    from megafusion.inference.settings import GenerationConfig as Settings

    d = Settings()
    GenerationConfig(
        bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id,
        pad_token_id=hf_config.pad_token_id, boi_token_id=hf_config.boi_token_id,
        eoi_token_id=hf_config.eoi_token_id, max_length=cfg.data.seq_length,
        num_inference_steps=d.steps, guidance_scale=d.cfg_scale, cfg_interval=list(d.cfg_interval),
        timestep_shift=float(cfg.objective.timestep_shift), solver=d.solver, captioning=cfg.objective.captioning,
    ).save_pretrained(str(out))


def copy_remote_code(out: Path) -> None:
    here = Path(__file__).parent
    for name in REMOTE_CODE:
        shutil.copyfile(here / name, out / name)


def to_hf(checkpoint, out, *, dtype: str = "fp32", max_shard_size="5GB", tokenizer: Optional[str] = None,
          encoder: Optional[dict] = None, overwrite: bool = False) -> ConversionReport:
    from megafusion.hf.adapter import MegafusionStateDictAdapter, hf_config_from_megafusion
    from megafusion.hf.configuration_megafusion import AUTO_MAP, MODEL_CLASS_NAME
    from megafusion.model import model_provider  # noqa: F401  (torch + megatron-core imported before the baseline)

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    limit = hf_folder.parse_size(max_shard_size)
    start = time.time()
    stage = hf_folder.Staging(out, overwrite)
    try:
        baseline = hf_folder.peak_rss_bytes()
        cfg, model, step, folder = load_single_process(checkpoint)
        tok, enc = _assets(cfg, folder, tokenizer, encoder)
        hf_config = hf_config_from_megafusion(cfg)
        hf_config.encoder = enc
        hf_config.megafusion_source = {"checkpoint": str(folder), "step": step}
        hf_config.auto_map = dict(AUTO_MAP)
        hf_config.architectures = [MODEL_CLASS_NAME]
        hf_config.dtype = "bfloat16" if dtype == "bf16" else "float32"
        adapter = MegafusionStateDictAdapter(hf_config)
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        model_bytes = sum(v.numel() * v.element_size() for v in state.values())
        names, source = _plan(adapter, state, DTYPES[dtype])
        shards = hf_folder.plan_shards(names, limit)
        cache: Dict[str, Dict[str, torch.Tensor]] = {}

        def fetch(name: str) -> torch.Tensor:
            mname = source[name]
            if mname not in cache:
                cache.clear()  # shards are written in plan order: one megatron tensor's outputs at a time
                cache[mname] = adapter.to_hf(mname, state[mname])
            return cache[mname][name].to(DTYPES[dtype])

        files = hf_folder.write_shards(stage.path, shards, fetch)
        cache.clear()
        hf_config.to_json_file(str(stage.path / hf_folder.CONFIG))
        copy_remote_code(stage.path)
        write_generation_config(stage.path, cfg, hf_config)
        from megafusion.data.special_tokens import SPECIAL_TOKENS

        if not hf_folder.write_tokenizer(stage.path, tok, SPECIAL_TOKENS):
            logger.warning("no tokenizer known for %s (trained on generated data?): the folder has none", folder)
        report = ConversionReport(out=stage.out, tensors=sum(len(s) for s in shards), files=files,
                                  weight_bytes=sum(t.nbytes for s in shards for t in s), model_bytes=model_bytes,
                                  baseline_rss=baseline, peak_rss=hf_folder.peak_rss_bytes(),
                                  seconds=time.time() - start)
        (stage.path / "conversion.json").write_text(json.dumps(
            {"from": str(folder), "step": step, "dtype": dtype, "peak_rss": report.peak_rss,
             "baseline_rss": baseline, "model_bytes": model_bytes}, indent=2) + "\n")
        stage.publish()
    except BaseException:
        stage.discard()
        raise
    return report


def _plan(adapter, state: Dict[str, torch.Tensor], dtype: torch.dtype):
    """HF tensors in adapter order with their sizes at `dtype`, and the megatron tensor each comes from."""
    size = torch.empty((), dtype=dtype).element_size()
    planned, source = [], {}
    known = set(adapter.megatron_names())
    missing = [m for m in adapter.megatron_names() if m not in state]
    unmapped = sorted(m for m in state if m not in known)
    if missing or unmapped:  # nothing is dropped silently
        raise ValueError(f"the checkpoint's model and the Hugging Face mapping disagree: "
                         f"{'missing ' + ', '.join(missing) if missing else ''}"
                         f"{'; ' if missing and unmapped else ''}"
                         f"{'without a Hugging Face name: ' + ', '.join(unmapped) if unmapped else ''}")
    for mname in adapter.megatron_names():
        for name, t in adapter.to_hf(mname, state[mname]).items():  # views or one transient copy
            planned.append(hf_folder.PlannedTensor(name, t.numel() * size))
            source[name] = mname
    return planned, source
