"""Generated corpora for the preprocessing tests: tiny PNG/JPEG images, a parquet holding every record kind, a
JSONL with image paths, and a tiny tokenizer trained on the same text."""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np

WORDS = ("red green blue small large cat dog bird tree house river mountain city light dark image photo of a the "
         "and with on in under over near far quick slow bright cloudy sunny night day morning evening").split()


def sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def image_bytes(seed: int, size=(16, 16), fmt: str = "PNG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def mixed_rows(n: int, seed: int = 0, size=(16, 16)):
    """Rows cycling through text / image_text / interleaved / video, images as PNG or JPEG bytes."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = ("text", "image_text", "interleaved", "video")[i % 4]
        fmt = "PNG" if i % 2 else "JPEG"
        row = {"kind": kind, "text": None, "image": None, "texts": None, "images": None, "frames": None}
        if kind == "text":
            row["text"] = " ".join(sentence(rng) for _ in range(3))
        elif kind == "image_text":
            row["text"], row["image"] = sentence(rng), image_bytes(seed * 100003 + i, size, fmt)
        elif kind == "interleaved":
            row["texts"] = [sentence(rng), None, sentence(rng), None]
            row["images"] = [None, image_bytes(seed * 100003 + i, size, fmt), None,
                             image_bytes(seed * 100003 + i + 50000, size, fmt)]
        else:
            row["text"] = sentence(rng)
            row["frames"] = [image_bytes(seed * 100003 + i * 7 + f, size, fmt) for f in range(3)]
        rows.append(row)
    return rows


def write_parquet(path: str, rows, row_group_size: int = 64, text_type=None) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("kind", pa.string()), ("text", text_type or pa.string()), ("image", pa.binary()),
                        ("texts", pa.list_(pa.string())), ("images", pa.list_(pa.binary())),
                        ("frames", pa.list_(pa.binary()))])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_jsonl_with_paths(folder: str, n: int, seed: int = 1, size=(16, 16), name: str = "data.jsonl") -> str:
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        for i in range(n):
            if i % 2:
                f.write(json.dumps({"text": " ".join(sentence(rng) for _ in range(2))}) + "\n")
            else:
                rel = f"img/{seed}_{i}.png"
                with open(os.path.join(folder, rel), "wb") as g:
                    g.write(image_bytes(seed * 7919 + i, size))
                f.write(json.dumps({"text": sentence(rng), "image": rel}) + "\n")
    return path


def train_tiny_tokenizer(folder: str, vocab_size: int = 96, model_type: str = "bpe") -> str:
    from megafusion.preprocess.tokenizer_training import train_tokenizer

    rng = random.Random(7)
    path = os.path.join(folder, "tok_text.jsonl")
    with open(path, "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(sentence(rng) for _ in range(3))}) + "\n")
    return train_tokenizer([path], os.path.join(folder, f"tok_{model_type}"), vocab_size=vocab_size,
                           model_type=model_type)


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is a folder of scripts, not a package)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(f"megafusion_tool_{name}", os.path.join(root, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
