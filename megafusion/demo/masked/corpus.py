"""The tri-modal corpus of the masked-diffusion demo, deterministic given the seed.

    python -m megafusion.demo.masked.corpus --out DIR [--seed 0] [--scale 1.0] [--audio-rate 1000]

Layout:

    DIR/train.parquet          records for tools/preprocess_data.py --family masked_diffusion: columns kind
                               (text | image_text | audio_text), text, image (PNG bytes or null), audio (WAV bytes
                               or null), meta (JSON: the scene or tone class; ignored by preprocessing)
    DIR/tokenizer_text.jsonl   every record's text as {"kind": "text", "text": ...} (tools/train_tokenizer.py)
    DIR/eval/text_to_image.jsonl  prompts for `megafusion generate` ({"id", "text", "generate": "image", "seed"})
    DIR/eval/audio.jsonl          prompts ({"id", "text", "generate": "audio", "seconds", "seed"})
    DIR/eval/truth.json        {id: scene dict | tone class} of every prompt
    DIR/split.json             the settings and the document counts per kind

Documents (each kind from its own random stream, seeded by (seed, kind)):

- ``text``: `megafusion.demo.captions.world_document` facts about the shapes world plus sentences about the tones;
- ``image_text``: a caption (half the canonical wording "a red circle on the left", half the varied templates)
  and the 32x32 render of a one-object scene of megafusion.demo.world;
- ``audio_text``: a phrase naming a tone class ("a low tone", "a rising whistle", ...) and a clip of that class
  (megafusion.demo.masked.audio) with a random amplitude, starting at phase 0.

The evaluation prompts are fresh scenes from a separate stream (canonical captions), and one prompt per tone class
and canonical phrase.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import wave
from typing import Dict, List

import numpy as np

from megafusion.demo import captions as cap
from megafusion.demo.masked import audio as tones
from megafusion.demo.world import render, sample_scene

COUNTS = {"text": 800, "image_text": 2400, "audio_text": 1000}
AUDIO_SECONDS = 0.1
STREAMS = {"text": 1, "image_text": 2, "audio_text": 3, "eval_image": 4, "eval_audio": 5}


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[stream]])


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(waveform: np.ndarray, rate: int) -> bytes:
    pcm = np.clip(np.rint(np.clip(waveform, -1, 1) * 32768.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def _tone_sentence(rng: np.random.Generator) -> str:
    kind = tones.CLASSES[int(rng.integers(len(tones.CLASSES)))]
    phrase = tones.PHRASES[kind][int(rng.integers(len(tones.PHRASES[kind])))]
    return f"you can hear {phrase}."


def records(seed: int = 0, scale: float = 1.0, audio_rate: int = 1000) -> List[Dict]:
    """Every training record, in a seeded shuffled order."""
    out: List[Dict] = []
    counts = {k: max(1, int(round(v * scale))) for k, v in COUNTS.items()}
    rng = _rng(seed, "text")
    for _ in range(counts["text"]):
        text = cap.world_document(rng, n_sentences=int(rng.integers(2, 5)))
        text += " " + _tone_sentence(rng)
        out.append({"kind": "text", "text": text, "image": None, "audio": None, "meta": json.dumps({"doc": "text"})})
    rng = _rng(seed, "image_text")
    for i in range(counts["image_text"]):
        scene = sample_scene(rng, 1)
        text = cap.canonical_caption(scene) if i % 2 == 0 else cap.caption(scene, rng)
        out.append({"kind": "image_text", "text": text, "image": png_bytes(render(scene)), "audio": None,
                    "meta": json.dumps({"doc": "image_text", "scene": scene.to_dict()})})
    rng = _rng(seed, "audio_text")
    for _ in range(counts["audio_text"]):
        kind = tones.CLASSES[int(rng.integers(len(tones.CLASSES)))]
        phrase = tones.PHRASES[kind][int(rng.integers(len(tones.PHRASES[kind])))]
        wave_ = tones.tone(kind, audio_rate, AUDIO_SECONDS, amplitude=float(rng.uniform(0.5, 0.9)))
        out.append({"kind": "audio_text", "text": phrase, "image": None, "audio": wav_bytes(wave_, audio_rate),
                    "meta": json.dumps({"doc": "audio_text", "tone": kind})})
    order = np.random.default_rng([seed, 99]).permutation(len(out))
    return [out[i] for i in order]


def eval_prompts(seed: int = 0, n_images: int = 48, audio_per_class: int = 4) -> tuple:
    """(text->image prompts, audio prompts, truth): fresh scenes with canonical captions; tone phrases."""
    rng = _rng(seed, "eval_image")
    images, audio, truth = [], [], {}
    for i in range(n_images):
        scene = sample_scene(rng, 1)
        pid = f"t2i-{i:03d}"
        images.append({"id": pid, "text": cap.canonical_caption(scene), "generate": "image", "seed": 1000 + i})
        truth[pid] = scene.to_dict()
    n = 0
    for kind in tones.CLASSES:
        for j in range(audio_per_class):
            pid = f"audio-{kind}-{j}"
            phrase = tones.PHRASES[kind][j % len(tones.PHRASES[kind])]
            audio.append({"id": pid, "text": phrase, "generate": "audio", "seconds": AUDIO_SECONDS,
                          "seed": 2000 + n})
            truth[pid] = kind
            n += 1
    return images, audio, truth


def _jsonl(path: str, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_corpus(out: str, seed: int = 0, scale: float = 1.0, audio_rate: int = 1000, n_images: int = 48,
                 audio_per_class: int = 4) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    recs = records(seed, scale, audio_rate)
    table = pa.table({"kind": pa.array([r["kind"] for r in recs], pa.string()),
                      "text": pa.array([r["text"] for r in recs], pa.string()),
                      "image": pa.array([r["image"] for r in recs], pa.binary()),
                      "audio": pa.array([r["audio"] for r in recs], pa.binary()),
                      "meta": pa.array([r["meta"] for r in recs], pa.string())})
    pq.write_table(table, os.path.join(out, "train.parquet"))
    # the tokenizer always sees the full-size corpus's text, so a small --scale still trains a 256-piece model
    texts = recs if scale >= 1.0 else records(seed, 1.0, audio_rate)
    _jsonl(os.path.join(out, "tokenizer_text.jsonl"), ({"kind": "text", "text": r["text"]} for r in texts))
    images, audio, truth = eval_prompts(seed, n_images, audio_per_class)
    _jsonl(os.path.join(out, "eval", "text_to_image.jsonl"), images)
    _jsonl(os.path.join(out, "eval", "audio.jsonl"), audio)
    with open(os.path.join(out, "eval", "truth.json"), "w") as f:
        json.dump(truth, f, indent=1)
    counts = {k: sum(r["kind"] == k for r in recs) for k in COUNTS}
    info = {"seed": seed, "scale": scale, "audio_rate": audio_rate, "audio_seconds": AUDIO_SECONDS,
            "counts": counts, "eval": {"text_to_image": len(images), "audio": len(audio)}}
    with open(os.path.join(out, "split.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every document count")
    p.add_argument("--audio-rate", type=int, default=1000)
    p.add_argument("--eval-images", type=int, default=48)
    p.add_argument("--eval-audio-per-class", type=int, default=4)
    a = p.parse_args(argv)
    info = write_corpus(a.out, a.seed, a.scale, a.audio_rate, a.eval_images, a.eval_audio_per_class)
    print(f"corpus: {info['counts']} -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
