"""`megafusion generate` on a masked-diffusion checkpoint (objective.kind = masked_diffusion): prompt file ->
unified ids -> MaskedSampler -> text, PNG and WAV outputs. megafusion/inference/cli.py hands over here when the
checkpoint's config names that family; the flags are the command's own (module docstring of cli.py) plus
--order, --block-length and --audio-seconds.

Prompt file (JSONL), one prompt per line:

    {"id": "red-circle", "text": "a red circle on the left", "generate": "image", "seed": 3}
    {"text": "a low tone", "generate": "audio", "seconds": 0.25}
    {"generate": "text", "tokens": 24}

`generate` is image (text -> image, task image_text: the text is the caption span, the image's codes follow),
audio (text -> speech / sound, task audio_text) or text (a text document of `tokens` positions, task text; the
text is cut at the first end-of-text). Outputs in --out: results.json (per prompt: id, task, prompt text, seed,
generated text or the PNG / WAV file, the codes), one PNG per image and grid.png of a batch's images, one WAV per
audio clip. Text comes from the run's SentencePiece model, codes are decoded by the image / audio tokenizer the
training data's manifest.json names (megafusion.encoders.discrete).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from megafusion.discrete.vocab import AUDIO, IMAGE, TEXT

TASKS = {"image": ("image_text", IMAGE), "audio": ("audio_text", AUDIO), "text": ("text", TEXT)}
PROMPT_KEYS = {"id", "text", "generate", "seed", "tokens", "seconds"}


def read_masked_prompts(path: str, first_seed: int) -> List[dict]:
    """The prompt file's lines as dicts with id, text, generate, seed (errors name the file, line and key)."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                spec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc})") from exc
            if not isinstance(spec, dict) or set(spec) - PROMPT_KEYS:
                raise ValueError(f"{where}: unknown keys {sorted(set(spec) - PROMPT_KEYS)}; allowed "
                                 f"{sorted(PROMPT_KEYS)}")
            kind = spec.get("generate", "image")
            if kind not in TASKS:
                raise ValueError(f"{where}: generate={kind!r} is not one of {sorted(TASKS)}")
            if kind != "text" and not str(spec.get("text", "")).strip():
                raise ValueError(f"{where}: generate={kind} needs a non-empty \"text\" to condition on")
            out.append({"id": str(spec.get("id", f"prompt-{n}")), "text": str(spec.get("text", "")),
                        "generate": kind, "seed": int(spec.get("seed", first_seed + len(out))),
                        "tokens": spec.get("tokens"), "seconds": spec.get("seconds"), "where": where})
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def _tokenizers(cfg, manifest: Optional[dict], text_override: Optional[str]):
    from megafusion.encoders.discrete import build_discrete_tokenizer
    from megafusion.preprocess.tokenization import TextTokenizer

    manifest = manifest or {}
    path = text_override or cfg.data.tokenizer_model or (manifest.get("tokenizer") or {}).get("path")
    text = TextTokenizer(path) if path else None
    media = {}
    for key in ("image_tokenizer", "audio_tokenizer"):
        spec = manifest.get(key)
        if spec:
            media[key] = build_discrete_tokenizer({"name": spec["name"], "config": spec.get("config", {})})
    return text, media.get("image_tokenizer"), media.get("audio_tokenizer")


def build_prompts(specs, vocab, text_tok, image_tok, audio_tok, args):
    from megafusion.inference.masked.sampler import MaskedPrompt

    prompts = []
    for spec in specs:
        task, modality = TASKS[spec["generate"]]
        ids = []
        if spec["text"].strip():
            if text_tok is None:
                raise ValueError(f"{spec['where']}: text prompts need the run's SentencePiece model; pass --tokenizer")
            ids = list(text_tok.sp.encode(spec["text"]))
        if modality == TEXT:
            if ids:
                raise ValueError(f"{spec['where']}: generate=text samples a whole text document; leave out "
                                 f"\"text\" (continuing a given text is not supported by the span layout)")
            prompt_ids = [vocab.task(task)]
            length = int(spec["tokens"] or args.max_new_tokens)
        else:
            prompt_ids = list(vocab.document(task, [(TEXT, ids)]))
            if modality == IMAGE:
                if image_tok is None:
                    raise ValueError(f"{spec['where']}: the checkpoint's data has no image tokenizer")
                length = int(image_tok.tokens_per_item)
            else:
                if audio_tok is None:
                    raise ValueError(f"{spec['where']}: the checkpoint's data has no audio tokenizer")
                length = int(audio_tok.tokens_for_seconds(float(spec["seconds"] or args.audio_seconds)))
        prompts.append(MaskedPrompt(ids=prompt_ids, spans=[(modality, length)], seed=spec["seed"]))
    return prompts


def run_masked(args, folder: Path, cfg) -> int:
    """The whole command for a masked-diffusion checkpoint (errors in the inputs print one line, return 2)."""
    from PIL import Image

    from megafusion.encoders.discrete.audio_io import write_wav
    from megafusion.inference.loading import load_model, read_manifest
    from megafusion.inference.masked.sampler import MaskedGenerationConfig, MaskedSampler
    from megafusion.inference.outputs import grid_image
    from megafusion.objectives.masked_diffusion import vocab_from_config

    vocab = vocab_from_config(cfg.objective.masked_diffusion)
    try:
        specs = read_masked_prompts(args.prompts, args.seed)
        text_tok, image_tok, audio_tok = _tokenizers(cfg, read_manifest(cfg, folder), args.tokenizer)
        prompts = build_prompts(specs, vocab, text_tok, image_tok, audio_tok, args)
        overrides = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k),
                                       ("top_p", args.top_p), ("order", args.order),
                                       ("block_length", args.block_length), ("seq_length", cfg.data.seq_length))}
        if args.cfg_scale is not None:
            overrides["cfg_scale"] = args.cfg_scale
        if args.steps is not None:
            overrides.update(text_steps=args.steps, image_steps=args.steps, audio_steps=args.steps)
        settings = MaskedGenerationConfig.from_objective(cfg.objective.masked_diffusion, **overrides)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"megafusion generate: {exc}", file=sys.stderr)
        return 2
    model, step, device = load_model(folder, cfg, args.device)
    from megafusion.encoders.discrete import DiscreteTokenizer

    code_ranges = {m: tok.code_range for m, tok in ((IMAGE, image_tok), (AUDIO, audio_tok))
                   if tok is not None and type(tok).code_range is not DiscreteTokenizer.code_range}
    sampler = MaskedSampler(model, vocab, device=device, code_ranges=code_ranges)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        results = sampler.generate(batch, settings)
        images = []
        for spec, result in zip(specs[start:start + len(batch)], results):
            span = result.spans[0]
            rec = {"id": spec["id"], "generate": spec["generate"], "prompt": spec["text"], "seed": spec["seed"],
                   "codes": [int(c) for c in span.codes]}
            if spec["generate"] == "image":
                image = image_tok.decode(np.asarray(span.codes))
                Image.fromarray(image).save(out / f"{spec['id']}.png")
                rec["image"] = f"{spec['id']}.png"
                images.append(image)
            elif spec["generate"] == "audio":
                write_wav(out / f"{spec['id']}.wav", audio_tok.decode(np.asarray(span.codes)), audio_tok.sample_rate)
                rec["audio"] = f"{spec['id']}.wav"
            else:
                rec["text"] = text_tok.sp.decode([int(c) for c in span.codes]) if text_tok is not None else None
                print(f"[{spec['id']}] {rec['text']}")
            records.append(rec)
        if images:
            Image.fromarray(grid_image(images)).save(out / f"grid_{start // args.batch_size:03d}.png")
    header = {"checkpoint": str(folder), "step": step, "family": "masked_diffusion",
              "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__}}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({**header, "results": records}, indent=2))
    os.replace(tmp, out / "results.json")
    print(f"wrote {out / 'results.json'}")
    return 0
