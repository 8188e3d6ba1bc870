"""Hugging Face folder -> megafusion checkpoint (`tools/convert_checkpoint.py from-hf`).

    report = from_hf("hf/x", "ckpt/x", tp=2, pp=2, ep=1)
    megafusion train --config ckpt/x/iter_0000000/config.yaml data.paths=[...] checkpoint.load=ckpt/x
    megafusion generate --checkpoint ckpt/x --prompts p.jsonl --out out/

1. read config.json and rebuild the megafusion config: the model section (from the `megafusion_model` the
   exporter stored, else from the Hugging Face fields), the context length, captioning rule and timestep shift from
   generation_config.json, and the target layout. The Config's own checks refuse a layout the model cannot be
   split into (heads or query groups not divisible by TP, layers by PP, experts by EP) before any tensor is read;
2. check the folder's tensor names against the model's (missing and unknown names listed), then fill a model
   built in this one process tensor by tensor from the memory-mapped shards (fused QKV and gated fc1 re-fused
   exactly by the adapter; every shape checked, the error names the tensor and both shapes);
3. save it as a megafusion checkpoint at step 0 (megatron dist_checkpointing, torch_dist: tensors are stored with
   their global shapes and offsets, so the same files load into the target TP / PP / EP layout, which
   config.yaml records; no optimizer state, so training starts a fresh optimizer), with the tokenizer
   (tokenizer.model, named in config.yaml) and the frozen encoder (encoder.json) beside it;
4. publish the whole folder atomically (temporary sibling name, fsync, rename).

The embedding and LM head rows beyond the real vocabulary are padding: when the target TP pads the vocabulary
to another size (make_vocab_size_divisible_by x TP), padding rows are added as zeros or dropped.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import List, Optional

import torch

from megafusion.hf import folder as hf_folder
from megafusion.hf.export import ConversionReport, build_uninitialized
from megafusion.inference.loading import ENCODER_FILE

logger = logging.getLogger("megafusion.convert")

VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def target_config(hf: hf_folder.HFFolder, tp: int, pp: int, ep: int, tokenizer: Optional[str] = None):
    """The megafusion Config of the converted checkpoint at the target layout (ValueError naming the flag)."""
    from megafusion.config import load_config
    from megafusion.hf.adapter import model_overrides_from_hf
    from megafusion.hf.configuration_megafusion import MegafusionConfig

    hf_config = MegafusionConfig.from_dict(hf.config)
    overrides = list(model_overrides_from_hf(hf_config))
    gen_path = hf.path / hf_folder.GENERATION_CONFIG
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    if "max_length" in gen:
        overrides.append(f"data.seq_length={int(gen['max_length'])}")
    if "captioning" in gen:
        overrides.append(f"objective.captioning={gen['captioning']}")
    if "timestep_shift" in gen:
        overrides.append(f"objective.timestep_shift={float(gen['timestep_shift'])}")
    if tokenizer:
        overrides.append(f"data.tokenizer_model={tokenizer}")
    layout = [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
              f"parallel.expert_model_parallel_size={ep}", "parallel.virtual_pipeline_model_parallel_size=null",
              "parallel.sequence_parallel=false", "checkpoint.load=auto"]
    try:
        return hf_config, load_config(None, overrides + layout)
    except ValueError as exc:
        raise ValueError(f"--tp {tp} --pp {pp} --ep {ep}: the model of {hf.path} cannot be laid out this way: "
                         f"{exc}") from None


def _single_process(cfg, divisible_by: int):
    """`cfg` at TP = PP = EP = 1 with the vocabulary padded as the target layout pads it (a copy)."""
    single = copy.deepcopy(cfg)
    p = single.parallel
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = p.expert_model_parallel_size = 1
    single.model.transformer_impl = "local"
    single.model.make_vocab_size_divisible_by = divisible_by
    single.training.precision = "fp32"
    return single


def _fit_vocab(name: str, tensor: torch.Tensor, rows: int, real: int) -> torch.Tensor:
    """Pad (zeros) or cut the padding rows of a vocabulary-sized tensor to `rows`; real rows are never cut."""
    if tensor.shape[0] == rows:
        return tensor
    if rows < real:
        raise ValueError(f"{name}: cannot fit {tensor.shape[0]} vocabulary rows into {rows} (< {real} real ones)")
    if tensor.shape[0] > rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def from_hf(hf_dir, out, *, tp: int = 1, pp: int = 1, ep: int = 1, overwrite: bool = False) -> ConversionReport:
    from megafusion.checkpoint.checkpointer import save_checkpoint
    from megafusion.checkpoint.train_state import TrainState
    from megafusion.config import to_yaml
    from megafusion.hf.adapter import MegafusionStateDictAdapter
    from megafusion.parallel.initialize import destroy_parallel, initialize_parallel

    from megafusion.model import model_provider  # noqa: F401  (torch + megatron-core imported before the baseline)

    start = time.time()
    hf = hf_folder.HFFolder(hf_dir)
    stage = hf_folder.Staging(out, overwrite)
    try:
        has_tokenizer = (hf.path / hf_folder.TOKENIZER_FILE).is_file()
        tokenizer = str(stage.out / hf_folder.TOKENIZER_FILE) if has_tokenizer else None
        hf_config, cfg = target_config(hf, tp, pp, ep, tokenizer)
        adapter = MegafusionStateDictAdapter(hf_config)
        megatron_names = adapter.megatron_names()
        hf.check_names(n for m in megatron_names for n in adapter.hf_names(m))
        baseline = hf_folder.peak_rss_bytes()
        single = _single_process(cfg, cfg.model.make_vocab_size_divisible_by * tp)
        initialize_parallel(single.parallel, single.training.seed)
        try:
            model = build_uninitialized(single)
            params = model.state_dict(keep_vars=True)
            unknown = [m for m in megatron_names if m not in params]
            if unknown:
                raise ValueError(f"{hf.path}: config.json describes tensors the rebuilt model does not have: "
                                 f"{', '.join(unknown)}")
            with torch.no_grad():
                for mname in megatron_names:
                    tensor = adapter.from_hf(mname, hf.tensors(adapter.hf_names(mname)))
                    target = params[mname]
                    if mname in VOCAB_TENSORS:
                        tensor = _fit_vocab(mname, tensor, target.shape[0], cfg.model.vocab_size)
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise ValueError(f"{hf.path}: {mname} (from {', '.join(adapter.hf_names(mname))}) has shape "
                                         f"{tuple(tensor.shape)} but the model built from config.json needs "
                                         f"{tuple(target.shape)}")
                    target.copy_(tensor)
                    del tensor
            model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            save_checkpoint(stage.path, TrainState(), [model], None, config_yaml=to_yaml(cfg), keep_last=1)
        finally:
            destroy_parallel()
        if has_tokenizer:
            shutil.copyfile(hf.path / hf_folder.TOKENIZER_FILE, stage.path / hf_folder.TOKENIZER_FILE)
        encoder = hf.config.get("encoder")
        if encoder:
            (stage.path / ENCODER_FILE).write_text(json.dumps(encoder, indent=2) + "\n")
        files = sorted(str(p.relative_to(stage.path)) for p in stage.path.rglob("*") if p.is_file())
        report = ConversionReport(out=stage.out, tensors=len(megatron_names), files=files,
                                  weight_bytes=model_bytes, model_bytes=model_bytes, baseline_rss=baseline,
                                  peak_rss=hf_folder.peak_rss_bytes(), seconds=time.time() - start)
        stage.publish()
    except BaseException:
        stage.discard()
        raise
    logger.info("converted %s -> %s (layout tp=%d pp=%d ep=%d)", hf.path, stage.out, tp, pp, ep)
    return report


def read_encoder(checkpoint_root: Path) -> Optional[dict]:
    """encoder.json beside a converted checkpoint ({"name", "config"}), or None."""
    path = Path(checkpoint_root) / ENCODER_FILE
    return json.loads(path.read_text()) if path.is_file() else None


__all__: List[str] = ["from_hf", "read_encoder", "target_config"]
