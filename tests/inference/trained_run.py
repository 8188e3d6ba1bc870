"""A tiny trained run for the generation tests: corpus -> tokenizer -> preprocess (pixel encoder, 8x8) -> a few
training steps with a checkpoint. Everything the real `megafusion generate` reads: config.yaml, checkpoints/,
the dataset's manifest.json, the tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

RESOLUTION, SEQ, VOCAB = 8, 128, 96
TRAIN_OVERRIDES = [f"data.seq_length={SEQ}", f"model.vocab_size={VOCAB}", "model.latent_channels=3",
                   f"model.latent_size={RESOLUTION}", "data.num_workers=0", "logging.tensorboard=false",
                   "optimizer.warmup_steps=1"]


def make_dataset(root: Path) -> SimpleNamespace:
    from preprocess_corpus import image_bytes, load_tool, mixed_rows, train_tiny_tokenizer, write_parquet

    corpus = write_parquet(str(root / "corpus.parquet"), mixed_rows(48, size=(16, 16)))
    tokenizer = train_tiny_tokenizer(str(root), vocab_size=VOCAB)
    load_tool("preprocess_data").main(["--input", corpus, "--output", str(root / "ds"), "--tokenizer", tokenizer,
                                       "--resolution", str(RESOLUTION), "--min-image-size", "8", "--seq-length",
                                       str(SEQ), "--no-progress"])
    os.makedirs(root / "img", exist_ok=True)
    (root / "img" / "a.png").write_bytes(image_bytes(3, (16, 16)))
    return SimpleNamespace(root=root, dataset=root / "ds", tokenizer=tokenizer, image=root / "img" / "a.png")


def make_trained_run(root: Path, steps: int = 4) -> SimpleNamespace:
    from megafusion.config import load_config
    from megafusion.training.loop import train

    data = make_dataset(root)
    run_dir = root / "run"
    train(load_config("tiny", TRAIN_OVERRIDES + [f"data.paths=[{data.dataset}]", f"training.train_steps={steps}",
                                                 f"training.run_dir={run_dir}"]))
    data.run = run_dir
    return data
