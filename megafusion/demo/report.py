"""The demo's report: an image grid PNG with captions, loss-curve PNGs from metrics.jsonl (one run, or several
side by side, e.g. fixed vs adaptive loss weighting) and a readable report.md.

- `image_grid(images, captions, path)`: images ([H, W, 3] uint8 or float in [0, 1]) upscaled with nearest
  neighbour, each with its caption wrapped under it (Pillow);
- `read_metrics(path)`: a run's metrics.jsonl (one JSON object per logged step, as megafusion.training.metrics
  writes it); non-finite values logged as strings ("nan", "inf") become floats, a step logged twice (a resumed
  run) keeps its last line, and a malformed line is an error naming the file and line;
- `plot_loss_curves(runs, path)`: one column per run (a path, a list of paths, records, or {label: run}); CE
  and FM losses on top, the loss weights (weight_ce, weight_fm) below, shared y axes so runs compare at a glance
  (matplotlib, Agg backend, imported lazily);
- `write_report(path, title, sections)`: markdown from a dict of sections, each a string (a paragraph), a list
  (bullets) or a dict with any of "text", "commands" (a bash block), "metrics" (a table: value, target, chance,
  pass), "images" (embedded, paths relative to the report) and "notes" (bullets), rendered in that order.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

LOSS_KEYS = ("loss_ce", "loss_fm")
WEIGHT_KEYS = ("weight_ce", "weight_fm")


# ---------------------------------------------------------------------------------------------------- image grid
def _to_uint8(image, index: int) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"images[{index}] must be [H, W, 3] (or [H, W]), got shape {array.shape}")
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = (np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0) * 255).round().astype(np.uint8)
    return array


def image_grid(images: Sequence, captions: Sequence[str], path: str, columns: int = 8, scale: int = 4,
               caption_lines: int = 3) -> str:
    """Write a PNG grid of `images` with `captions` under them; returns `path`."""
    from PIL import Image, ImageDraw, ImageFont

    if len(images) == 0:
        raise ValueError("images is empty; a grid needs at least one image")
    if len(captions) != len(images):
        raise ValueError(f"captions has {len(captions)} entries for {len(images)} images; give one per image")
    if columns < 1 or scale < 1 or caption_lines < 0:
        raise ValueError(f"columns={columns}, scale={scale} must be >= 1 and caption_lines={caption_lines} >= 0")
    arrays = [_to_uint8(im, i) for i, im in enumerate(images)]
    cell_w = max(a.shape[1] for a in arrays) * scale
    cell_h = max(a.shape[0] for a in arrays) * scale
    font = ImageFont.load_default()
    line_h = 12
    chars = max(8, cell_w // 6)
    pad = 6
    rows = math.ceil(len(arrays) / columns)
    cols = min(columns, len(arrays))
    text_h = caption_lines * line_h
    canvas = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + text_h + 2 * pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (array, text) in enumerate(zip(arrays, captions)):
        r, c = divmod(i, columns)
        x, y = pad + c * (cell_w + pad), pad + r * (cell_h + text_h + 2 * pad)
        tile = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
        canvas.paste(tile, (x, y))
        draw.rectangle([x - 1, y - 1, x + tile.width, y + tile.height], outline=(160, 160, 160))
        lines = textwrap.wrap(str(text), chars)[:caption_lines]
        for k, line in enumerate(lines):
            draw.text((x, y + cell_h + 3 + k * line_h), line, fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------------- curves
def _number(value):
    if isinstance(value, str):
        try:
            return float(value)  # "nan", "inf" as MetricsWriter logs non-finite values
        except ValueError:
            return value
    return value


def read_metrics(path: str) -> List[dict]:
    """The logged steps of a metrics.jsonl, sorted by step, the last line winning for a repeated step."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"metrics file {path!r} does not exist (a run writes <run_dir>/metrics.jsonl)")
    by_step: Dict[int, dict] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError(f"{path}:{lineno}: each line must be an object with an integer 'step'")
            by_step[record["step"]] = {k: _number(v) for k, v in record.items()}
    return [by_step[s] for s in sorted(by_step)]


def _series(records: Sequence[dict], key: str) -> Tuple[List[int], List[float]]:
    pairs = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


RunSpec = Union[str, Sequence[dict]]


def plot_loss_curves(runs: Union[RunSpec, Mapping[str, RunSpec]], path: str, title: Optional[str] = None) -> str:
    """Write a PNG of CE/FM losses (top row) and loss weights (bottom row), one column per run. `runs`: a
    metrics.jsonl path or a list of records, or a {label: path-or-records} mapping for runs side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(runs, (str, os.PathLike)):
        runs = {os.path.basename(os.path.dirname(os.path.abspath(runs))) or "run": runs}
    elif isinstance(runs, Sequence) and runs and all(isinstance(r, (str, os.PathLike)) for r in runs):
        runs = {f"{os.path.basename(os.path.dirname(os.path.abspath(r))) or 'run'} ({i})": r
                for i, r in enumerate(runs)}
    elif isinstance(runs, Sequence) and not isinstance(runs, Mapping):
        runs = {"run": runs}
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs must be a metrics.jsonl path, a list of records or a non-empty {label: run} mapping")
    loaded = {label: read_metrics(os.fspath(r)) if isinstance(r, (str, os.PathLike)) else list(r)
              for label, r in runs.items()}
    for label, records in loaded.items():
        if not any(_series(records, k)[0] for k in LOSS_KEYS):
            raise ValueError(f"run {label!r} has no {' or '.join(LOSS_KEYS)} values to plot")
    fig, axes = plt.subplots(2, len(loaded), figsize=(5.5 * len(loaded), 6.5), squeeze=False, sharex="col",
                             sharey="row")
    for col, (label, records) in enumerate(loaded.items()):
        top, bottom = axes[0][col], axes[1][col]
        for key, style in zip(LOSS_KEYS, ("tab:blue", "tab:orange")):
            steps, values = _series(records, key)
            if steps:
                top.plot(steps, values, color=style, label=key.replace("loss_", "").upper() + " loss")
        for key, style in zip(WEIGHT_KEYS, ("tab:blue", "tab:orange")):
            steps, values = _series(records, key)
            if steps:
                bottom.plot(steps, values, color=style, linestyle="--", label=key)
        top.set_title(str(label))
        top.set_ylabel("loss")
        bottom.set_ylabel("weight")
        bottom.set_xlabel("step")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            if ax.get_lines():
                ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- markdown
def _passes(value, target) -> Optional[bool]:
    """`target`: a number (value >= it) or a string ">= x", "> x", "<= x", "< x"; None: no target."""
    if target is None or not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(target, (int, float)):
        return value >= target
    text = str(target).strip()
    for op in (">=", "<=", ">", "<"):
        if text.startswith(op):
            bound = float(text[len(op):])
            return {">=": value >= bound, "<=": value <= bound, ">": value > bound, "<": value < bound}[op]
    raise ValueError(f"target {target!r} must be a number or a string like '>= 0.5' or '< 2.0'")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metrics_table(metrics: Mapping[str, object]) -> List[str]:
    """Markdown table rows; each value a number or {"value"/"accuracy", "target", "chance"}."""
    lines = ["| metric | value | target | chance | pass |", "|---|---|---|---|---|"]
    for name, entry in metrics.items():
        if isinstance(entry, Mapping):
            value = entry.get("value", entry.get("accuracy"))
            target, chance = entry.get("target"), entry.get("chance")
        else:
            value, target, chance = entry, None, None
        ok = _passes(value, target)
        mark = "-" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {name} | {_fmt(value)} | {_fmt(target)} | {_fmt(chance)} | {mark} |")
    return lines


def _section(body, folder: str) -> List[str]:
    if isinstance(body, str):
        return [body.strip()]
    if isinstance(body, (list, tuple)):
        return [f"- {item}" for item in body]
    if not isinstance(body, Mapping):
        raise ValueError(f"a section must be a str, a list or a dict, got {type(body).__name__}")
    unknown = set(body) - {"text", "commands", "metrics", "images", "notes"}
    if unknown:
        raise ValueError(f"unknown section keys {sorted(unknown)}; use text, commands, metrics, images, notes")
    out: List[str] = []
    if body.get("text"):
        out += [str(body["text"]).strip(), ""]
    if body.get("commands"):
        out += ["```bash", *map(str, body["commands"]), "```", ""]
    if body.get("metrics"):
        out += metrics_table(body["metrics"]) + [""]
    images = body.get("images") or []
    items = images.items() if isinstance(images, Mapping) else [(p, os.path.basename(str(p))) for p in images]
    for image_path, caption in items:
        rel = os.path.relpath(os.path.abspath(image_path), folder) if os.path.isabs(image_path) else image_path
        out += [f"![{caption}]({rel})", ""]
    for note in body.get("notes") or []:
        out.append(f"- {note}")
    while out and out[-1] == "":
        out.pop()
    return out


def write_report(path: str, title: str, sections: Mapping[str, object]) -> str:
    """Write report.md: "# title", then "## name" and the rendered body of each section, in order."""
    if not isinstance(sections, Mapping) or not sections:
        raise ValueError("sections must be a non-empty {name: body} mapping")
    folder = os.path.dirname(os.path.abspath(path))
    lines = [f"# {title}", ""]
    for name, body in sections.items():
        lines += [f"## {name}", "", *_section(body, folder), ""]
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path
