"""The deterministic, model-free scene analyser of the demo (a mini-GenEval detector): RGB image -> objects.

`detect_objects` finds the objects of an image of the visual world (megafusion.demo.world) and names, for each,
its color, shape and position; `relation` names how two of them stand; `detect_direction` names where the main
object of a video moves. No model, no randomness: the same pixels always give the same answer.

How (each step is chosen to survive noisy or blurry generated images):

1. background: the per-channel median of the image border;
2. foreground: pixels that differ from the background by > FG_DISTANCE and are chromatic (max - min channel >
   FG_CHROMA; every named color is saturated, the backgrounds are grey), cleaned by a 3x3 vote that drops isolated
   noise pixels and fills pinholes;
3. objects: 8-connected components of the foreground with at least `min_size` pixels (default 1.2% of the image);
   a component holding two large regions of different colors (touching objects) is split by color;
4. color: the hue of the per-channel median of the component's most saturated half, matched to the nearest named
   hue (hue does not change when a color is blended with a grey background, which is what blur does);
5. coverage: how much of that color each pixel holds (projection onto color - background: linear in blur, noise
   averages out); the object's outline is its half-coverage level, which blur does not move on straight edges;
6. shape: analysis by synthesis on the coverage around the object: each shape is drawn with the measured area
   and centroid (blur keeps both), blurred by the sigma that explains the extra spread (blur adds 2 sigma^2 to
   var_x + var_y), and the one with the smallest squared error wins;
7. position: where the half-coverage bounding-box centre lies: "center" within 1/8 of the side from the middle,
   else the dominant axis decides left/right/top/bottom.

Anything unreadable (NaN, constant, mostly foreground such as dense noise) gives an empty list, not an error; a
wrong array shape is a ValueError naming the argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megafusion.demo.world import COLORS, SHAPES

FG_DISTANCE = 60.0  # RGB distance (0..441) from the background
FG_CHROMA = 45.0  # max - min channel (0..255)
MIN_SIZE_FRACTION = 0.012
MAX_FOREGROUND_FRACTION = 0.6  # more than this is not a scene on a plain background: nothing is reported
CENTER_FRACTION = 0.125
MIN_MOTION_FRACTION = 0.05
SPLIT_FRACTION = 0.25
WINDOW_PAD = 4  # pixels around an object's outline that its shape fit sees (room for blur)
SUPERSAMPLE = 4
# (var_x + var_y) / area of each shape: square s^2/6 / s^2; disk (r^2/2) / (pi r^2); triangle (7 s^2/72) / (s^2/2)
SHAPE_SPREAD = {"circle": 1 / (2 * np.pi), "square": 1 / 6, "triangle": 7 / 36}


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image; box = (x0, y0, x1, y1) in pixels, x1/y1 exclusive; (cx, cy) its centre."""

    color: str
    shape: str
    position: str
    cx: float
    cy: float
    box: Tuple[int, int, int, int]
    area: int
    centroid: Tuple[float, float]

    def to_dict(self) -> dict:
        return {"color": self.color, "shape": self.shape, "position": self.position, "cx": self.cx,
                "cy": self.cy, "box": list(self.box), "area": self.area, "centroid": list(self.centroid)}


# ---------------------------------------------------------------------------------------------------- pixels
def as_rgb(image) -> np.ndarray:
    """[H, W, 3] float64 in 0..255 from uint8 0..255 or float 0..1 ([H, W, 4] drops alpha); NaN/Inf -> 0."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.shape[0] < 2 or array.shape[1] < 2:
        raise ValueError(f"image must be an [H, W, 3] RGB array (H, W >= 2), got shape {array.shape}")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"image must be uint8 or float, got dtype {array.dtype}")
    array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    if np.issubdtype(np.asarray(image).dtype, np.integer):
        return np.clip(array, 0, 255)
    return np.clip(array, 0.0, 1.0) * 255.0


def hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of [..., 3] RGB values (0 where the color is grey)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.where(mx - mn > 0, mx - mn, 1.0)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return np.where(mx - mn > 0, h * 60.0, 0.0) % 360.0


_NAMES = tuple(COLORS)
_HUES = hue(np.array([COLORS[n] for n in _NAMES], dtype=np.float64))


def nearest_color(hues: np.ndarray) -> np.ndarray:
    """Index into COLORS' names of the named color nearest in hue, for each hue (degrees)."""
    diff = np.abs(np.asarray(hues)[..., None] - _HUES)
    return np.minimum(diff, 360.0 - diff).argmin(-1)


def background_color(rgb: np.ndarray) -> np.ndarray:
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    return np.median(border, axis=0)


def _box_sum3(mask: np.ndarray) -> np.ndarray:
    """Number of set pixels in each pixel's 3x3 neighbourhood (itself included)."""
    p = np.pad(mask.astype(np.int32), 1)
    h, w = mask.shape
    return sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))


def foreground_mask(rgb: np.ndarray, bg: np.ndarray) -> np.ndarray:
    mask = (np.linalg.norm(rgb - bg, axis=-1) > FG_DISTANCE) & (rgb.max(-1) - rgb.min(-1) > FG_CHROMA)
    count = _box_sum3(mask)
    return (mask & (count >= 3)) | (~mask & (count >= 7))


def label_components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """8-connected components: (labels [H, W] with -1 for background and 0..n-1 in raster order of their first
    pixel, n)."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        m = lab
        for dy in range(3):
            for dx in range(3):
                m = np.minimum(m, p[dy:dy + h, dx:dx + w])
        m = np.where(mask, m, big)
        flat = m.ravel()
        fg = flat < big
        for _ in range(4):  # pointer jumping: follow each label to its own label
            flat[fg] = flat[flat[fg]]
        if np.array_equal(m, lab):
            break
        lab = m
    roots, labels = np.unique(lab[mask], return_inverse=True)
    out = np.full((h, w), -1, dtype=np.int64)
    out[mask] = labels
    return out, len(roots)


# ---------------------------------------------------------------------------------------------------- objects
def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (zero padding: outside is background)."""
    if sigma < 0.05:
        return image
    r = int(np.ceil(3 * sigma))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma * sigma))
    k /= k.sum()
    h, w = image.shape
    p = np.pad(image, ((r, r), (0, 0)))
    out = sum(k[i] * p[i:i + h] for i in range(len(k)))
    p = np.pad(out, ((0, 0), (r, r)))
    return sum(k[i] * p[:, i:i + w] for i in range(len(k)))


def synthetic_coverage(shape: str, area: float, mx: float, my: float, height: int, width: int) -> np.ndarray:
    """[height, width] pixel coverage (area-sampled, SUPERSAMPLE^2 points a pixel) of `shape` with `area` and
    centroid (mx, my), as the world draws it (triangles point up)."""
    ys, xs = (np.mgrid[0:height * SUPERSAMPLE, 0:width * SUPERSAMPLE] + 0.5) / SUPERSAMPLE
    if shape == "square":
        half = np.sqrt(area) / 2
        inside = (np.abs(xs - mx) <= half) & (np.abs(ys - my) <= half)
    elif shape == "circle":
        inside = (xs - mx) ** 2 + (ys - my) ** 2 <= area / np.pi
    else:  # side s = base = height, area s^2 / 2, centroid 2s/3 below the apex
        side = np.sqrt(2 * area)
        y = ys - (my - 2 * side / 3)
        inside = (y >= 0) & (y <= side) & (np.abs(xs - mx) <= y / 2)
    return inside.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3))


def classify_shape(coverage: np.ndarray) -> str:
    """The shape whose blurred synthetic coverage fits `coverage` (a window around one object, 1 inside, 0 on the
    background) best. Area and centroid do not change under blur, and blur adds 2*sigma^2 to the spread
    (var_x + var_y), so each candidate is drawn at the measured area and centroid and blurred by the sigma that
    explains the spread it lacks; the smallest squared error wins."""
    cov = np.clip(np.nan_to_num(coverage), -0.5, 1.5)
    h, w = cov.shape
    area = float(cov.sum())
    if area < 1.0:
        return SHAPES[0]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    mx, my = float((cov * xs).sum() / area), float((cov * ys).sum() / area)
    spread = float((cov * ((xs - mx) ** 2 + (ys - my) ** 2)).sum() / area)
    errors = {}
    for shape in SHAPES:
        sigma = np.sqrt(max(0.0, (spread - SHAPE_SPREAD[shape] * area) / 2))
        fit = gaussian_blur(synthetic_coverage(shape, area, mx, my, h, w), sigma)
        errors[shape] = float(((fit - cov) ** 2).sum())
    return min(SHAPES, key=errors.get)


def classify_position(cx: float, cy: float, height: int, width: int) -> str:
    dx, dy = cx - width / 2, cy - height / 2
    if abs(dx) < CENTER_FRACTION * width and abs(dy) < CENTER_FRACTION * height:
        return "center"
    if abs(dx) / width >= abs(dy) / height:
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _object_color(rgb_pixels: np.ndarray) -> Tuple[str, np.ndarray]:
    """(named color, RGB of the object's core: the per-channel median of its most saturated half)."""
    chroma = rgb_pixels.max(-1) - rgb_pixels.min(-1)
    core = np.median(rgb_pixels[chroma >= np.median(chroma)], axis=0)
    return _NAMES[int(nearest_color(hue(core)))], core


def _split_by_color(region: np.ndarray, rgb: np.ndarray, min_size: int) -> List[np.ndarray]:
    """The component as one mask, or one per color when it holds several large single-color regions."""
    names = np.full(region.shape, -1)
    names[region] = nearest_color(hue(rgb[region]))
    counts = np.bincount(names[region], minlength=len(_NAMES))
    big = [i for i in np.argsort(-counts, kind="stable")
           if counts[i] >= max(min_size, SPLIT_FRACTION * region.sum())]
    if len(big) < 2:
        return [region]
    parts = []
    for i in big:
        sub, n = label_components(names == i)
        parts += [sub == k for k in range(n) if (sub == k).sum() >= min_size]
    return parts or [region]


def _dilate(mask: np.ndarray) -> np.ndarray:
    return _box_sum3(mask) > 0


def _coverage(rgb: np.ndarray, bg: np.ndarray, color: np.ndarray) -> np.ndarray:
    """[H, W] how much of `color` (over the background) each pixel holds: the projection of (pixel - bg) onto
    (color - bg), 1 for the color itself, 0 for the background; linear in blur, and it averages noise out."""
    v = color - bg
    norm = float(v @ v)
    return ((rgb - bg) @ v) / norm if norm >= 1.0 else np.zeros(rgb.shape[:2])


def _half_mask(part: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """The object's half-coverage mask: pixels near `part` whose 3x3-smoothed coverage is >= 0.5. Blur moves the
    low-threshold outline of `part` outwards and rounds it; the half level stays on the true edges."""
    h, w = part.shape
    smooth = np.pad(coverage, 1, mode="edge")
    smooth = sum(smooth[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0
    half = (smooth >= 0.5) & _dilate(part)
    if not half.any():
        return part
    labels, n = label_components(half)
    return labels == int(np.bincount(labels[half], minlength=n).argmax())


def _window(part: np.ndarray, others: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """The coverage around `part` (WINDOW_PAD pixels on each side), with other objects and their rims zeroed."""
    ys, xs = np.nonzero(part)
    h, w = part.shape
    y0, y1 = max(0, ys.min() - WINDOW_PAD), min(h, ys.max() + 1 + WINDOW_PAD)
    x0, x1 = max(0, xs.min() - WINDOW_PAD), min(w, xs.max() + 1 + WINDOW_PAD)
    blocked = _dilate(_dilate(others)) & ~_dilate(part)
    return np.where(blocked, 0.0, coverage)[y0:y1, x0:x1]


def detect_objects(image, min_size: Optional[int] = None) -> List[DetectedObject]:
    """The objects of an RGB image ([H, W, 3] uint8, or float in [0, 1]), largest first (ties: top-left first).
    `min_size`: the fewest pixels an object may have (default 1.2% of the image, at least 4)."""
    rgb = as_rgb(image)
    height, width = rgb.shape[:2]
    if min_size is None:
        min_size = max(4, int(round(MIN_SIZE_FRACTION * height * width)))
    elif not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ValueError(f"min_size={min_size!r} must be a positive integer (pixels)")
    bg = background_color(rgb)
    mask = foreground_mask(rgb, bg)
    if mask.mean() > MAX_FOREGROUND_FRACTION:
        return []
    labels, n = label_components(mask)
    parts = []
    for k in range(n):
        region = labels == k
        if region.sum() >= min_size:
            parts += _split_by_color(region, rgb, min_size)
    found = []
    for part in parts:
        name, color = _object_color(rgb[part])
        coverage = _coverage(rgb, bg, color)
        half = _half_mask(part, coverage)
        ys, xs = np.nonzero(half)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        shape = classify_shape(_window(part, mask & ~part, coverage))
        found.append(DetectedObject(name, shape, classify_position(cx, cy, height, width), cx, cy,
                                    (x0, y0, x1, y1), int(part.sum()),
                                    (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)))
    return sorted(found, key=lambda o: (-o.area, o.box[1], o.box[0]))


def relation(a: DetectedObject, b: DetectedObject) -> str:
    """How `a` stands to `b`: "left of", "right of", "above" or "below" (the larger of the two offsets decides)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


# ---------------------------------------------------------------------------------------------------- videos
def _match(objects: Sequence[DetectedObject], ref: DetectedObject) -> DetectedObject:
    for same in (lambda o: o.color == ref.color and o.shape == ref.shape, lambda o: o.color == ref.color):
        hits = [o for o in objects if same(o)]
        if hits:
            return hits[0]
    return objects[0]


def detect_direction(frames: Sequence, min_motion: Optional[float] = None) -> Optional[str]:
    """Where the main object moves between the first and the last frame in which objects are found: "left",
    "right", "up" or "down" (the larger displacement of its pixel centroid decides), or None when no object is
    found or it moves less than `min_motion` pixels (default 5% of the frame width)."""
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        frames = list(frames)
    if not isinstance(frames, (list, tuple)) or len(frames) < 2:
        raise ValueError(f"frames must be a list of at least 2 images, got {type(frames).__name__}"
                         + (f" of length {len(frames)}" if isinstance(frames, (list, tuple)) else ""))
    detected = [detect_objects(f) for f in frames]
    seen = [d for d in detected if d]
    if len(seen) < 2:
        return None
    first = seen[0][0]
    last = _match(seen[-1], first)
    dx, dy = last.centroid[0] - first.centroid[0], last.centroid[1] - first.centroid[1]
    width = as_rgb(frames[0]).shape[1]
    limit = MIN_MOTION_FRACTION * width if min_motion is None else float(min_motion)
    if max(abs(dx), abs(dy)) < limit:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"
