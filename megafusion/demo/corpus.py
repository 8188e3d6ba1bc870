"""The demo's corpus on disk: a train split as parquet (the columns tools/preprocess_data.py reads) and a held-out
evaluation set as JSONL + PNG, both deterministic given the seed.

Layout written by `write_corpus(root, config)`:

    root/split.json                  what was written: config, held-out and train (shape, color) pairs, files,
                                     document counts per kind, the world's vocabulary of names
    root/train/part-NNNNN.parquet    rows shuffled across kinds; columns kind, text, image, texts, images, frames
                                     (megafusion.preprocess.records) plus `meta`, a JSON string with the row's
                                     document type and ground-truth scenes (ignored by preprocessing)
    root/eval/text_to_image.jsonl    {"id", "split", "kind": "single"|"pair", "prompt", "scene"}
    root/eval/text_to_video.jsonl    {"id", "split", "prompt", "video"}
    root/eval/image_to_text.jsonl    {"id", "split", "kind", "image": "images/<id>.png", "reference", "scene"}
    root/eval/images/<id>.png

Train document types (the `meta.doc` value; `kind` is the record kind preprocessing sees):

- ``text`` (kind text): `world_document` facts and example captions;
- ``caption_image`` (kind image_text): caption, then the image;
- ``image_caption`` (kind interleaved, [image, caption]): the image, then its caption;
- ``interleaved`` (kind interleaved): "text, image, text about it, another image" stories;
- ``video`` (kind video): caption, then `video_frames` frames of a moving shape.

Held out: `held_out` (shape, color) pairs appear nowhere in training — no image, caption, story, video or text
document names or shows them — while every shape and every color still appears with other partners. The eval set
asks for them ("held_out" items) next to fresh scenes of trained pairs ("seen" items). Each document type draws
from its own random stream (seeded by (seed, type)), so changing one count leaves the other types unchanged.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megafusion.demo import captions as cap
from megafusion.demo.world import BACKGROUNDS, COLORS, DIRECTIONS, POSITIONS, RELATIONS, SHAPES, Scene, \
    VideoScene, all_pairs, render, render_video, sample_scene, sample_video, single_object_scene, two_object_scene

DOC_TYPES = ("text", "caption_image", "image_caption", "interleaved", "video")
COLUMNS = ("kind", "text", "image", "texts", "images", "frames", "meta")


@dataclass
class CorpusConfig:
    seed: int = 0
    image_size: int = 32
    background: str = "white"
    n_text: int = 200
    """text-only world documents"""
    n_caption_image: int = 1000
    """caption-then-image documents (kind image_text)"""
    n_image_caption: int = 500
    """image-then-caption documents (kind interleaved)"""
    n_interleaved: int = 200
    """text, image, text, image stories (kind interleaved)"""
    n_video: int = 200
    video_frames: int = 4
    two_object_fraction: float = 0.3
    """share of the images (outside videos) that hold two objects"""
    held_out: Optional[List[Tuple[str, str]]] = None
    """(shape, color) pairs never in training; None: `n_held_out` pairs drawn from the seed"""
    n_held_out: int = 3
    eval_single: int = 30
    eval_pair: int = 30
    eval_video: int = 20
    eval_captions: int = 30
    eval_seen: int = 10
    """per eval task, extra items built from trained pairs, for comparison with the held-out ones"""
    rows_per_file: int = 5000
    row_group_size: int = 256

    def __post_init__(self):
        for name in ("n_text", "n_caption_image", "n_image_caption", "n_interleaved", "n_video", "eval_single",
                     "eval_pair", "eval_video", "eval_captions", "eval_seen", "n_held_out"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"CorpusConfig.{name}={value!r} must be a non-negative integer")
        for name in ("rows_per_file", "row_group_size", "video_frames"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"CorpusConfig.{name}={value!r} must be a positive integer")
        if self.video_frames < 2:
            raise ValueError(f"CorpusConfig.video_frames={self.video_frames!r} must be >= 2")
        if not 0.0 <= self.two_object_fraction <= 1.0:
            raise ValueError(f"CorpusConfig.two_object_fraction={self.two_object_fraction!r} must be in [0, 1]")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"CorpusConfig.background={self.background!r} is not one of {list(BACKGROUNDS)}")
        if self.held_out is not None:
            self.held_out = [tuple(p) for p in self.held_out]
        if sum((self.n_text, self.n_caption_image, self.n_image_caption, self.n_interleaved, self.n_video)) == 0:
            raise ValueError("CorpusConfig: every n_* document count is 0; the train split would be empty")


# ---------------------------------------------------------------------------------------------------- held out
def choose_held_out(seed: int, n: int) -> List[Tuple[str, str]]:
    """`n` (shape, color) pairs with distinct colors, shapes taken in turn, so each color loses at most one
    partner and each shape at most ceil(n / 3)."""
    if not 0 <= n <= len(COLORS):
        raise ValueError(f"n_held_out={n!r} must be in [0, {len(COLORS)}] (one per color at most)")
    colors = np.random.default_rng([seed, 7919]).permutation(list(COLORS))
    return [(SHAPES[i % len(SHAPES)], str(colors[i])) for i in range(n)]


def check_held_out(held_out: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """The train pairs left by `held_out`; an error when a shape or color would vanish from training or a pair
    is not a (shape, color) of the world."""
    pairs = all_pairs()
    for p in held_out:
        if tuple(p) not in pairs:
            raise ValueError(f"held_out pair {p!r} is not a (shape, color) of the world: shapes {list(SHAPES)}, "
                             f"colors {list(COLORS)}")
    train = [p for p in pairs if p not in set(map(tuple, held_out))]
    for s in SHAPES:
        if not any(p[0] == s for p in train):
            raise ValueError(f"held_out removes every color of shape {s!r}; keep at least one in training")
    for c in COLORS:
        if not any(p[1] == c for p in train):
            raise ValueError(f"held_out removes every shape of color {c!r}; keep at least one in training")
    return train


# ---------------------------------------------------------------------------------------------------- documents
def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def read_png(path: str) -> np.ndarray:
    """[H, W, 3] uint8 of a PNG file (e.g. an eval image_to_text entry's `image`)."""
    with open(path, "rb") as f:
        return decode_png(f.read())


def _row(kind: str, meta: dict, **values) -> dict:
    row = {c: None for c in COLUMNS}
    row.update(kind=kind, meta=json.dumps(meta, sort_keys=True), **values)
    return row


def _one(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _count_words(scene: Scene) -> str:
    return "one shape" if len(scene.objects) == 1 else "two shapes"


def _scene(rng, cfg: CorpusConfig, pairs) -> Scene:
    n_objects = 2 if rng.random() < cfg.two_object_fraction else 1
    return sample_scene(rng, n_objects, cfg.image_size, cfg.background, pairs)


def _story(rng, cfg: CorpusConfig, pairs) -> dict:
    """text, image, text about it, image (and sometimes a closing text)."""
    if rng.random() < 0.5:  # one object seen at two positions
        shape, color = _one(rng, pairs)
        p1, p2 = rng.choice(len(POSITIONS), size=2, replace=False)
        s1, s2 = (single_object_scene(shape, color, POSITIONS[p], cfg.image_size, cfg.background, rng)
                  for p in (p1, p2))
        texts = [f"here is a {color} {_one(rng, cap.SHAPE_SYNONYMS[shape])}.", None,
                 f"it is {_one(rng, cap.POSITION_PHRASES[s1.position])}. in the next picture it is "
                 f"{_one(rng, cap.POSITION_PHRASES[s2.position])}:", None]
    else:  # two pictures, then a sentence about both
        s1, s2 = _scene(rng, cfg, pairs), _scene(rng, cfg, pairs)
        texts = [f"{cap.caption(s1, rng)}.", None, f"after that, {cap.caption(s2, rng)}:", None,
                 f"the first picture shows {_count_words(s1)} and the second {_count_words(s2)}."]
    images = [None, png_bytes(render(s1)), None, png_bytes(render(s2))] + [None] * (len(texts) - 4)
    return _row("interleaved", {"doc": "interleaved", "scenes": [s1.to_dict(), s2.to_dict()]}, texts=texts,
                images=images)


def _document(doc: str, rng: np.random.Generator, cfg: CorpusConfig, pairs) -> dict:
    if doc == "text":
        text = cap.world_document(rng, int(rng.integers(3, 9)), pairs, cfg.background)
        return _row("text", {"doc": doc}, text=text)
    if doc == "caption_image":
        scene = _scene(rng, cfg, pairs)
        return _row("image_text", {"doc": doc, "scenes": [scene.to_dict()]}, text=cap.caption(scene, rng),
                    image=png_bytes(render(scene)))
    if doc == "image_caption":
        scene = _scene(rng, cfg, pairs)
        return _row("interleaved", {"doc": doc, "scenes": [scene.to_dict()]},
                    texts=[None, cap.caption(scene, rng)], images=[png_bytes(render(scene)), None])
    if doc == "interleaved":
        return _story(rng, cfg, pairs)
    video = sample_video(rng, cfg.video_frames, cfg.image_size, cfg.background, pairs)
    return _row("video", {"doc": doc, "video": video.to_dict()}, text=cap.caption(video, rng),
                frames=[png_bytes(f) for f in render_video(video)])


def train_rows(cfg: CorpusConfig, pairs: Sequence[Tuple[str, str]]) -> List[dict]:
    """Every train document as a row, shuffled across types (deterministic)."""
    counts = dict(zip(DOC_TYPES, (cfg.n_text, cfg.n_caption_image, cfg.n_image_caption, cfg.n_interleaved,
                                  cfg.n_video)))
    rows = []
    for index, doc in enumerate(DOC_TYPES):
        rng = np.random.default_rng([cfg.seed, index])
        rows += [_document(doc, rng, cfg, pairs) for _ in range(counts[doc])]
    order = np.random.default_rng([cfg.seed, len(DOC_TYPES)]).permutation(len(rows))
    return [rows[i] for i in order]


def _write_parquet(path: str, rows: List[dict], row_group_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("kind", pa.string()), ("text", pa.string()), ("image", pa.binary()),
                        ("texts", pa.list_(pa.string())), ("images", pa.list_(pa.binary())),
                        ("frames", pa.list_(pa.binary())), ("meta", pa.string())])
    tmp = path + ".tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, row_group_size=row_group_size)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- eval
def _eval_items(cfg: CorpusConfig, held_out, train_pairs) -> Dict[str, List[dict]]:
    rng = np.random.default_rng([cfg.seed, len(DOC_TYPES) + 1])
    n, bg = cfg.image_size, cfg.background
    out = {"text_to_image": [], "text_to_video": [], "image_to_text": []}

    def other(first):
        return _one(rng, [p for p in train_pairs if p != first])

    for split, pairs, counts in (("held_out", held_out, (cfg.eval_single, cfg.eval_pair, cfg.eval_video,
                                                          cfg.eval_captions)),
                                 ("seen", train_pairs, (cfg.eval_seen,) * 4)):
        if not pairs:
            continue
        n_single, n_pair, n_video, n_captions = counts
        combos = [(p, pos) for pos in POSITIONS for p in pairs]  # all (pair, position) in a shuffled cycle
        combos = [combos[i] for i in rng.permutation(len(combos))]
        for i in range(n_single):
            (shape, color), position = combos[i % len(combos)]
            scene = single_object_scene(shape, color, position, n, bg)
            out["text_to_image"].append({"split": split, "kind": "single", "scene": scene})
        for i in range(n_pair):
            first = _one(rng, pairs)
            second = other(first)
            if rng.random() < 0.5:
                first, second = second, first
            scene = two_object_scene(first, RELATIONS[i % len(RELATIONS)], second, n, bg)
            out["text_to_image"].append({"split": split, "kind": "pair", "scene": scene})
        for i in range(n_video):
            video = sample_video(rng, cfg.video_frames, n, bg, [_one(rng, pairs)], DIRECTIONS[i % len(DIRECTIONS)])
            out["text_to_video"].append({"split": split, "video": video})
        for i in range(n_captions):
            if i % 3 == 2:
                first = _one(rng, pairs)
                scene = two_object_scene(first, _one(rng, RELATIONS), other(first), n, bg, rng)
            else:
                scene = sample_scene(rng, 1, n, bg, [_one(rng, pairs)])
            out["image_to_text"].append({"split": split, "kind": "single" if len(scene.objects) == 1 else "pair",
                                         "scene": scene})
    return out


def _write_eval(root: str, items: Dict[str, List[dict]]) -> Dict[str, str]:
    folder = os.path.join(root, "eval")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    prefixes = {"text_to_image": "t2i", "text_to_video": "t2v", "image_to_text": "i2t"}
    files = {}
    for task, entries in items.items():
        lines = []
        for i, item in enumerate(entries):
            entry = {"id": f"{prefixes[task]}-{i:05d}", "split": item["split"]}
            if task == "text_to_video":
                entry.update(prompt=cap.canonical_caption(item["video"]), video=item["video"].to_dict())
            else:
                entry.update(kind=item["kind"], scene=item["scene"].to_dict())
                if task == "text_to_image":
                    entry["prompt"] = cap.canonical_caption(item["scene"])
                else:
                    entry["image"] = f"images/{entry['id']}.png"
                    entry["reference"] = cap.canonical_caption(item["scene"])
                    with open(os.path.join(folder, entry["image"]), "wb") as f:
                        f.write(png_bytes(render(item["scene"])))
            lines.append(json.dumps(entry, sort_keys=True))
        files[task] = f"eval/{task}.jsonl"
        with open(os.path.join(root, files[task]), "w") as f:
            f.write("".join(line + "\n" for line in lines))
    return files


def load_eval(root: str) -> Dict[str, List[dict]]:
    """The eval set of a corpus folder: per task, its entries with `scene` as a Scene, `video` as a VideoScene
    and `image` as an absolute path."""
    out = {}
    for task in ("text_to_image", "text_to_video", "image_to_text"):
        path = os.path.join(root, "eval", f"{task}.jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"root={root!r}: no {path}; write the corpus with write_corpus first")
        entries = []
        with open(path) as f:
            for line in f:
                entry = json.loads(line)
                if "scene" in entry:
                    entry["scene"] = Scene.from_dict(entry["scene"])
                if "video" in entry:
                    entry["video"] = VideoScene.from_dict(entry["video"])
                if "image" in entry:
                    entry["image"] = os.path.join(root, "eval", entry["image"])
                entries.append(entry)
        out[task] = entries
    return out


# ---------------------------------------------------------------------------------------------------- all
def write_corpus(root: str, config: Optional[CorpusConfig] = None) -> dict:
    """Write the train parquet files, the eval set and split.json under `root` (train parts left by an earlier
    write are removed, so `train/*.parquet` is exactly this corpus); returns split.json's content."""
    cfg = config or CorpusConfig()
    if not isinstance(cfg, CorpusConfig):
        raise TypeError(f"config must be a CorpusConfig, got {type(cfg).__name__}")
    held_out = list(cfg.held_out) if cfg.held_out is not None else choose_held_out(cfg.seed, cfg.n_held_out)
    train_pairs = check_held_out(held_out)
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    rows = train_rows(cfg, train_pairs)
    files = []
    for start in range(0, len(rows), cfg.rows_per_file):
        name = f"train/part-{start // cfg.rows_per_file:05d}.parquet"
        _write_parquet(os.path.join(root, name), rows[start:start + cfg.rows_per_file], cfg.row_group_size)
        files.append(name)
    for stale in sorted(os.listdir(os.path.join(root, "train"))):  # parts of an earlier, larger write
        if stale.startswith("part-") and stale.endswith(".parquet") and f"train/{stale}" not in files:
            os.remove(os.path.join(root, "train", stale))
    eval_items = _eval_items(cfg, held_out, train_pairs)
    eval_files = _write_eval(root, eval_items)
    info = {
        "seed": cfg.seed, "image_size": cfg.image_size, "background": cfg.background,
        "held_out_pairs": [list(p) for p in held_out], "train_pairs": [list(p) for p in train_pairs],
        "train": {"files": files, "rows": len(rows),
                  "documents": {d: sum(json.loads(r["meta"])["doc"] == d for r in rows) for d in DOC_TYPES}},
        "eval": {task: {"file": eval_files[task], "items": len(items),
                        "held_out": sum(i["split"] == "held_out" for i in items)}
                 for task, items in eval_items.items()},
        "world": {"colors": list(COLORS), "shapes": list(SHAPES), "positions": list(POSITIONS),
                  "relations": list(RELATIONS), "directions": list(DIRECTIONS)},
        "config": {k: ([list(p) for p in v] if k == "held_out" and v is not None else v)
                   for k, v in asdict(cfg).items()},
    }
    with open(os.path.join(root, "split.json"), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")
    return info
