"""Report helpers: the image grid, metrics.jsonl reading, loss-curve PNGs (one run and two side by side), and
report.md."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from megafusion.demo import report, world


def _write_metrics(path, steps, adaptive, extra_lines=()):
    with open(path, "w") as f:
        for s in range(1, steps + 1):
            record = {"step": s, "loss": 5.0, "loss_ce": 5.0 / s, "loss_fm": 1.5 - s / (2 * steps),
                      "weight_ce": 1.0 if not adaptive else 1.0 + 0.1 * np.sin(s), "weight_fm": 1.0, "lr": 1e-3}
            f.write(json.dumps(record) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def test_image_grid_places_upscaled_images_with_captions(tmp_path):
    scenes = [world.single_object_scene(s, "red", "center") for s in world.SHAPES] * 3
    images = [world.render(s) for s in scenes]
    images[1] = images[1].astype(np.float32) / 255  # floats in [0, 1] are accepted too
    path = report.image_grid(images, [f"caption number {i} about a red shape" for i in range(9)],
                             str(tmp_path / "grid" / "g.png"), columns=4, scale=3)
    grid = np.asarray(Image.open(path).convert("RGB"))
    pad, cell, text = 6, 96, 3 * 12
    assert grid.shape == (3 * (cell + text + 2 * pad) + pad, 4 * (cell + pad) + pad, 3)
    np.testing.assert_array_equal(grid[pad:pad + cell:3, pad:pad + cell:3], images[0])  # nearest upscale
    below = grid[pad + cell + 2:pad + cell + text, pad:pad + cell]
    assert (below < 128).any()  # caption text drawn under the tile
    with pytest.raises(ValueError, match="captions"):
        report.image_grid(images, ["one"], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="images"):
        report.image_grid([], [], str(tmp_path / "x.png"))


def test_read_metrics_handles_nan_resume_and_bad_lines(tmp_path):
    path = _write_metrics(str(tmp_path / "metrics.jsonl"), 3, False,
                          ['{"step": 2, "loss_ce": "nan", "loss_fm": 0.5}', ""])
    records = report.read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert np.isnan(records[1]["loss_ce"]) and records[1]["loss_fm"] == 0.5  # the later line for step 2 wins
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss_ce": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        report.read_metrics(str(bad))
    with pytest.raises(FileNotFoundError, match="metrics"):
        report.read_metrics(str(tmp_path / "missing.jsonl"))


def test_loss_curves_one_run_and_two_side_by_side(tmp_path):
    fixed = _write_metrics(str(tmp_path / "fixed.jsonl"), 30, False)
    adaptive = _write_metrics(str(tmp_path / "adaptive.jsonl"), 30, True)
    one = report.plot_loss_curves(fixed, str(tmp_path / "one.png"))
    two = report.plot_loss_curves({"fixed": fixed, "adaptive": adaptive}, str(tmp_path / "two.png"),
                                  title="fixed vs adaptive")
    w1, h1 = Image.open(one).size
    w2, h2 = Image.open(two).size
    assert os.path.getsize(one) > 5000 and os.path.getsize(two) > 5000
    assert h1 == h2 and w2 > 1.8 * w1  # a column per run
    records = report.read_metrics(fixed)
    assert report.plot_loss_curves(records, str(tmp_path / "records.png"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="loss_ce"):
        report.plot_loss_curves(str(empty), str(tmp_path / "e.png"))


def test_write_report_renders_every_section_kind(tmp_path):
    img = tmp_path / "figs" / "grid.png"
    img.parent.mkdir()
    img.write_bytes(b"png")
    path = report.write_report(str(tmp_path / "out" / "report.md"), "megafusion demo", {
        "Summary": "A tiny model learned the world.",
        "Commands": {"commands": ["megafusion demo --steps 100", "python tools/preprocess_data.py ..."]},
        "Metrics": {"text": "Held-out prompts.", "metrics": {
            "color": {"accuracy": 0.8, "target": 0.5, "chance": 1 / 6},
            "shape": {"value": 0.2, "target": ">= 0.5", "chance": 1 / 3},
            "final loss": {"value": 1.5, "target": "< 2.0"},
            "steps": 100}},
        "Images": {"images": {str(img): "generated grid"}, "notes": ["seed 0"]},
        "Notes": ["first", "second"],
    })
    text = open(path).read()
    assert text.startswith("# megafusion demo\n")
    for header in ("## Summary", "## Commands", "## Metrics", "## Images", "## Notes"):
        assert header in text
    assert "```bash\nmegafusion demo --steps 100\n" in text
    assert "| color | 0.8 | 0.5 | 0.1667 | yes |" in text
    assert "| shape | 0.2 | >= 0.5 | 0.3333 | **no** |" in text
    assert "| final loss | 1.5 | < 2.0 | - | yes |" in text and "| steps | 100 | - | - | - |" in text
    assert "![generated grid](../figs/grid.png)" in text and "- seed 0" in text and "- second" in text
    with pytest.raises(ValueError, match="unknown section keys"):
        report.write_report(str(tmp_path / "r.md"), "t", {"x": {"tables": []}})
    with pytest.raises(ValueError, match="target"):
        report.write_report(str(tmp_path / "r.md"), "t", {"x": {"metrics": {"m": {"value": 1, "target": "~1"}}}})
