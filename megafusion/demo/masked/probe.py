"""The masked demo's sampler-free check of text->image conditioning: given a clean caption and a fully masked image,
does the trained model put its image-code probability on the caption's colour, at the caption's position?

    python -m megafusion.demo.masked.probe --checkpoint RUN --prompts DIR/corpus/eval/text_to_image.jsonl \
        --truth DIR/corpus/eval/truth.json --out DIR/report/probe.json [--tokenizer tok.model]

Generated images mix what the model learned with how the sampler unmasks. This check reads one forward pass per
prompt over the row `megafusion generate` starts from (megafusion.inference.masked.sampler.layout_row; no
guidance, nothing sampled), so colour at chance here means training did not bind the caption's colour word, and a
good probe with poor samples points at the sampler. Per prompt (its scene's palette round trip gives the object
patches: the codes that differ from the background's):

    colour    the named colour whose code gets the most probability mass, summed over every patch weighted by that
              patch's probability of not being the background code, is the caption's (chance 1 / 6)
    position  of the k patches most likely not background, the fraction that are the scene's k object patches
              (chance k / patches, averaged)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from megafusion.demo.world import BACKGROUNDS, COLORS, Scene, render
from megafusion.discrete.vocab import IMAGE, TEXT


def _code_of(palette, rgb, size: int) -> int:
    return int(palette.encode(np.full((size, size, 3), rgb, dtype=np.uint8))[0])


def conditioning_probe(forward: Callable, vocab, captions: Sequence[Sequence[int]], scenes: Sequence[Scene],
                       palette, batch_size: int = 16) -> Dict[str, dict]:
    """`forward(rows)` -> logits [s, len(rows), vocab.size] (MaskedSampler.forward); `captions` the text
    tokenizer's ids of each scene's caption; `palette` the image tokenizer the run was trained with."""
    from megafusion.inference.masked.sampler import MaskedPrompt, layout_row

    if len(captions) != len(scenes) or not scenes:
        raise ValueError(f"need one caption per scene and at least one scene, got {len(captions)} captions and "
                         f"{len(scenes)} scenes")
    n_codes = palette.tokens_per_item
    lo, hi = vocab.content_range(IMAGE)
    names = list(COLORS)
    colour_hits, overlaps, chances = [], [], []
    for first in range(0, len(scenes), batch_size):
        rows, starts = [], []
        for ids in captions[first:first + batch_size]:
            row, ranges = layout_row(MaskedPrompt(ids=vocab.document("image_text", [(TEXT, list(ids))]),
                                                  spans=[(IMAGE, n_codes)]), vocab)
            rows.append(row)
            starts.append(ranges[0][0])
        logits = forward(rows)
        for j, scene in enumerate(scenes[first:first + batch_size]):
            size = scene.image_size
            codes = palette.encode(render(scene))
            background = _code_of(palette, BACKGROUNDS[scene.background], size)
            probs = torch.softmax(logits[starts[j]:starts[j] + n_codes, j, lo:hi].float(), -1).cpu().numpy()
            not_background = 1.0 - probs[:, background]
            mass = (probs * not_background[:, None]).sum(0)
            colour_codes = [_code_of(palette, COLORS[c], size) for c in names]
            colour_hits.append(names[int(np.argmax(mass[colour_codes]))] == scene.objects[0].color)
            objects = np.flatnonzero(codes != background)
            if objects.size:
                top = np.argsort(-not_background, kind="stable")[: objects.size]
                overlaps.append(len(set(top.tolist()) & set(objects.tolist())) / objects.size)
                chances.append(objects.size / n_codes)
    return {"colour": {"accuracy": float(np.mean(colour_hits)), "chance": 1.0 / len(names), "n": len(colour_hits)},
            "position": {"overlap": float(np.mean(overlaps)) if overlaps else None,
                         "chance": float(np.mean(chances)) if chances else None, "n": len(overlaps)}}


def _read_prompts(path: str) -> List[dict]:
    """The text->image prompts of a JSONL file (other kinds are skipped); bad lines name file and line."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON object ({exc.msg}); one prompt per line") from None
            if row.get("generate") == "image":
                if not isinstance(row.get("id"), str) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{n}: an image prompt needs string fields \"id\" and \"text\"")
                rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts with \"generate\": \"image\"")
    return rows


def main(argv=None) -> int:
    from megafusion.inference.loading import find_checkpoint, generation_config, load_model, read_manifest
    from megafusion.inference.masked.cli import _tokenizers
    from megafusion.inference.masked.sampler import MaskedSampler
    from megafusion.objectives.masked_diffusion import vocab_from_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint root or iter_* folder")
    p.add_argument("--prompts", required=True, help="text->image prompts (JSONL with id, text, generate=image)")
    p.add_argument("--truth", required=True, help="JSON {prompt id: scene dict} (the demo's eval/truth.json)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the one the data names)")
    a = p.parse_args(argv)
    try:
        folder = find_checkpoint(a.checkpoint)
        cfg = generation_config(folder / "config.yaml", 1, "fp32")
        text_tok, image_tok, _ = _tokenizers(cfg, read_manifest(cfg, folder), a.tokenizer)
        if text_tok is None or image_tok is None:
            raise ValueError(f"{a.checkpoint}: the probe needs the run's text and image tokenizers (the data's "
                             f"manifest names them; else pass --tokenizer)")
        prompts = _read_prompts(a.prompts)
        with open(a.truth) as f:
            truth = json.load(f)
        missing = [r["id"] for r in prompts if r["id"] not in truth]
        if missing:
            raise ValueError(f"{a.truth}: no scene for prompt ids {missing[:5]}")
        scenes = [Scene.from_dict(truth[r["id"]]) for r in prompts]
    except (OSError, ValueError, KeyError, TypeError) as exc:  # CheckpointNotFoundError is a FileNotFoundError
        print(f"megafusion.demo.masked.probe: {exc}", file=sys.stderr)
        return 2
    model, step, device = load_model(folder, cfg)
    vocab = vocab_from_config(cfg.objective.masked_diffusion)
    sampler = MaskedSampler(model, vocab, device=device)
    result = conditioning_probe(sampler.forward, vocab, [list(text_tok.sp.encode(r["text"])) for r in prompts],
                                scenes, image_tok)
    result["step"] = step
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(a.out + ".tmp", a.out)
    print(f"probe (step {step}): colour {result['colour']['accuracy']:.3f} (chance {result['colour']['chance']:.3f}), "
          f"position overlap {result['position']['overlap']:.3f} (chance {result['position']['chance']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
