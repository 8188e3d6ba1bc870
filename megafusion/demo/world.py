"""The procedural visual world of `megafusion demo`: scenes, their sampling and their deterministic renderer.

A scene is a small RGB image (default 32x32) on a plain background with one or two simple shapes:

- shapes: ``SHAPES`` (circle, square, triangle — triangles point up), drawn with hard edges (a pixel is inside
  when its centre is), about a third of the image wide, so they stay recognisable at 32x32;
- colors: ``COLORS``, six saturated, well-separated named colors (hues 0, 52, 127, 180, 234 and 300 degrees);
- one object sits at a named position (``POSITIONS``: left, right, top, bottom, center);
- two objects stand in a relation (``RELATIONS``: "left of", "right of", "above", "below"), stated as
  ``objects[0] <relation> objects[1]``; the two always differ in color or shape, so a caption names each uniquely.

A video (``VideoScene``) is one shape moving in a ``DIRECTIONS`` direction over ``n_frames`` frames (default 4);
`render_video` returns the frames as a list. Geometry scales with the image size (positions and sizes are
fractions of it), and every sampler takes a seeded ``numpy.random.Generator``, so a seed fixes every pixel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (235, 205, 20),
    "green": (30, 165, 45),
    "cyan": (20, 200, 200),
    "blue": (30, 50, 225),
    "magenta": (200, 40, 200),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: Tuple[str, ...] = ("left", "right", "top", "bottom", "center")
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")
DIRECTIONS: Tuple[str, ...] = ("left", "right", "up", "down")
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {"white": (255, 255, 255), "light grey": (225, 225, 225)}

INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Centre of an object at each named position, as fractions of the image side (x, y).
POSITION_ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
                    "center": (0.5, 0.5)}
# Objects are OBJECT_SIZE[0]..OBJECT_SIZE[1] of the image side (9.9-12.8 px at 32 px); jitter moves centres by
# up to JITTER of the side (only across the relation's axis for two objects, which keeps >= 3 px between them).
OBJECT_SIZE = (0.31, 0.40)
JITTER = 0.04
MIN_IMAGE_SIZE = 16


def _check_name(value: str, allowed, argument: str) -> str:
    if value not in allowed:
        raise ValueError(f"{argument}={value!r} is not one of {list(allowed)}")
    return value


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or size < MIN_IMAGE_SIZE:
        raise ValueError(f"size={size!r} must be an integer >= {MIN_IMAGE_SIZE} (pixels per image side)")
    return int(size)


@dataclass(frozen=True)
class SceneObject:
    """One shape: its centre (cx, cy) and side length in pixels, x to the right and y downwards."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    def __post_init__(self):
        _check_name(self.shape, SHAPES, "shape")
        _check_name(self.color, COLORS, "color")
        if not self.size > 0:
            raise ValueError(f"size={self.size!r} must be positive (pixels)")

    @property
    def box(self) -> Tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the shape's bounding square."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    """One or two objects on a background. `position` names where a single object is; `relation` states
    objects[0] <relation> objects[1] for two."""

    objects: Tuple[SceneObject, ...]
    image_size: int = 32
    background: str = "white"
    position: Optional[str] = None
    relation: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        _check_size(self.image_size)
        _check_name(self.background, BACKGROUNDS, "background")
        if len(self.objects) == 1:
            if self.position is not None:
                _check_name(self.position, POSITIONS, "position")
            if self.relation is not None:
                raise ValueError("relation is only for two-object scenes (this one has 1 object)")
        elif len(self.objects) == 2:
            _check_name(self.relation, RELATIONS, "relation")
            if self.position is not None:
                raise ValueError("position is only for one-object scenes (this one has 2 objects)")
        else:
            raise ValueError(f"objects: a scene holds 1 or 2 objects, got {len(self.objects)}")

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "image_size": self.image_size,
                "background": self.background, "position": self.position, "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(SceneObject(**o) for o in d["objects"]), d.get("image_size", 32),
                   d.get("background", "white"), d.get("position"), d.get("relation"))


@dataclass(frozen=True)
class VideoScene:
    """One shape moving `direction` by `step` pixels per frame, starting at (cx, cy)."""

    shape: str
    color: str
    direction: str
    cx: float
    cy: float
    size: float
    step: float
    n_frames: int = 4
    image_size: int = 32
    background: str = "white"

    def __post_init__(self):
        _check_name(self.shape, SHAPES, "shape")
        _check_name(self.color, COLORS, "color")
        _check_name(self.direction, DIRECTIONS, "direction")
        _check_size(self.image_size)
        _check_name(self.background, BACKGROUNDS, "background")
        if not isinstance(self.n_frames, (int, np.integer)) or self.n_frames < 2:
            raise ValueError(f"n_frames={self.n_frames!r} must be an integer >= 2")

    def frame_scenes(self) -> List[Scene]:
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[self.direction]
        return [Scene((SceneObject(self.shape, self.color, self.cx + dx * self.step * i,
                                   self.cy + dy * self.step * i, self.size),), self.image_size, self.background)
                for i in range(self.n_frames)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoScene":
        return cls(**d)


# ---------------------------------------------------------------------------------------------------- rendering
def _shape_mask(obj: SceneObject, n: int) -> np.ndarray:
    """[n, n] bool: pixels whose centre lies inside the shape."""
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    x, y, h = xs - obj.cx, ys - obj.cy, obj.size / 2
    if obj.shape == "circle":
        return x * x + y * y <= h * h
    if obj.shape == "square":
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    # triangle, apex up: apex (0, -h), base corners (+-h, h); inside when |x| <= (y + h) / 2 and y <= h
    return (y <= h) & (np.abs(x) <= (y + h) / 2)


def render(scene: Scene) -> np.ndarray:
    """The scene as a [H, W, 3] uint8 RGB image (same scene -> same bytes)."""
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene, got {type(scene).__name__}")
    n = scene.image_size
    image = np.empty((n, n, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        image[_shape_mask(obj, n)] = COLORS[obj.color]
    return image


def render_video(video: VideoScene) -> List[np.ndarray]:
    """The video's frames, in time order, each [H, W, 3] uint8."""
    if not isinstance(video, VideoScene):
        raise TypeError(f"video must be a VideoScene, got {type(video).__name__}")
    return [render(s) for s in video.frame_scenes()]


# ---------------------------------------------------------------------------------------------------- sampling
def _pick(rng: np.random.Generator, value: Optional[str], allowed: Sequence[str], argument: str) -> str:
    if value is None:
        return allowed[int(rng.integers(len(allowed)))]
    return _check_name(value, allowed, argument)


def _pick_pair(rng: np.random.Generator, pairs: Optional[Sequence[Tuple[str, str]]],
               exclude: Optional[Tuple[str, str]] = None) -> Tuple[str, str]:
    """A (shape, color) drawn uniformly from `pairs` (all combinations when None), other than `exclude`."""
    options = [tuple(p) for p in (all_pairs() if pairs is None else pairs) if tuple(p) != exclude]
    if not options:
        raise ValueError(f"pairs={pairs!r} holds no (shape, color) pair" + (f" other than {exclude!r}; a 2-object "
                                                                           f"scene needs two" if exclude else ""))
    return options[int(rng.integers(len(options)))]


def _size_and_jitter(rng: Optional[np.random.Generator], n: int) -> Tuple[float, float, float]:
    if rng is None:
        return n * sum(OBJECT_SIZE) / 2, 0.0, 0.0
    size = n * rng.uniform(*OBJECT_SIZE)
    jx, jy = rng.uniform(-JITTER, JITTER, size=2) * n
    return float(size), float(jx), float(jy)


def place_object(shape: str, color: str, position: str, image_size: int = 32,
                 rng: Optional[np.random.Generator] = None, jitter_x: bool = True,
                 jitter_y: bool = True) -> SceneObject:
    """An object at a named position; with `rng`, its size and centre are jittered (else the mean size, exact
    anchor)."""
    n = _check_size(image_size)
    ax, ay = POSITION_ANCHORS[_check_name(position, POSITIONS, "position")]
    size, jx, jy = _size_and_jitter(rng, n)
    return SceneObject(shape, color, ax * n + jx * jitter_x, ay * n + jy * jitter_y, size)


def single_object_scene(shape: str, color: str, position: str, image_size: int = 32, background: str = "white",
                        rng: Optional[np.random.Generator] = None) -> Scene:
    return Scene((place_object(shape, color, position, image_size, rng),), image_size, background, position=position)


def two_object_scene(first: Tuple[str, str], relation: str, second: Tuple[str, str], image_size: int = 32,
                     background: str = "white", rng: Optional[np.random.Generator] = None) -> Scene:
    """`first` <relation> `second`, each given as (shape, color)."""
    if tuple(first) == tuple(second):
        raise ValueError(f"first={first!r} and second={second!r} must differ in shape or color")
    where = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
             "below": ("bottom", "top")}[_check_name(relation, RELATIONS, "relation")]
    horizontal = relation in ("left of", "right of")
    objects = tuple(place_object(s, c, p, image_size, rng, jitter_x=not horizontal, jitter_y=horizontal)
                    for (s, c), p in zip((first, second), where))
    return Scene(objects, image_size, background, relation=relation)


def sample_scene(rng: np.random.Generator, n_objects: int = 1, image_size: int = 32, background: str = "white",
                 pairs: Optional[Sequence[Tuple[str, str]]] = None) -> Scene:
    """A random scene of 1 or 2 objects whose (shape, color) come from `pairs` (all combinations when None)."""
    if n_objects == 1:
        shape, color = _pick_pair(rng, pairs)
        return single_object_scene(shape, color, _pick(rng, None, POSITIONS, "position"), image_size, background,
                                   rng)
    if n_objects == 2:
        first = _pick_pair(rng, pairs)
        second = _pick_pair(rng, pairs, exclude=first)
        return two_object_scene(first, _pick(rng, None, RELATIONS, "relation"), second, image_size, background, rng)
    raise ValueError(f"n_objects={n_objects!r} must be 1 or 2")


def sample_video(rng: np.random.Generator, n_frames: int = 4, image_size: int = 32, background: str = "white",
                 pairs: Optional[Sequence[Tuple[str, str]]] = None, direction: Optional[str] = None) -> VideoScene:
    """A random moving shape: it crosses about 40% of the image along `direction`, staying fully inside."""
    n = _check_size(image_size)
    if not isinstance(n_frames, (int, np.integer)) or n_frames < 2:
        raise ValueError(f"n_frames={n_frames!r} must be an integer >= 2")
    shape, color = _pick_pair(rng, pairs)
    direction = _pick(rng, direction, DIRECTIONS, "direction")
    size, jx, jy = _size_and_jitter(rng, n)
    travel = n * rng.uniform(0.38, 0.46)
    start = n / 2 - travel / 2  # along the motion axis; moving right/down starts here, left/up ends here
    across = n / 2 + jy
    along = start + jx * 0.25 if direction in ("right", "down") else n - start + jx * 0.25
    cx, cy = (along, across) if direction in ("left", "right") else (across, along)
    return VideoScene(shape, color, direction, float(cx), float(cy), float(size), float(travel / (n_frames - 1)),
                      int(n_frames), n, background)


def all_pairs() -> List[Tuple[str, str]]:
    """Every (shape, color) combination, shapes outer."""
    return [(s, c) for s in SHAPES for c in COLORS]
