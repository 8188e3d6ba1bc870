"""Scores of the demo (mini-GenEval): generated images, captions and videos against the scenes they should show,
each metric next to its chance level, as plain dicts ready for metrics.json.

Every metric is a dict ``{"accuracy", "chance", "above_chance", "n"}`` (accuracy and above_chance are None when
n is 0). Chance is the accuracy a model would get by ignoring the prompt and producing a uniformly random scene
of the world (megafusion.demo.world) — or, for captions, the caption of one — with the prompted number of
objects (any number, for counting). It is computed exactly by enumerating the world, per item, then averaged.

- `score_text_to_image(items)`: items are (prompt Scene, generated image). One-object prompts score the largest
  detected object's color, shape and position and all three together (``object``); ``counting`` (number of
  objects found == prompted, over all prompts) and the two-object metrics are reported separately:
  ``pair_objects`` (both prompted (shape, color) found), ``relation`` (found and in the prompted relation) and
  ``relation_given_objects`` (relation right among the prompts whose two objects were found);
- `score_image_to_text(items)`: items are (true Scene, generated caption). ``color`` / ``shape``: the set of
  colors / shapes the caption names (synonyms and plurals count: "disk" is a circle) equals the scene's;
  ``object``: the set of color-shape pairs equals the scene's;
- `score_text_to_video(items)`: items are (prompt VideoScene or direction, frames). ``direction``: the main
  object moves as prompted (megafusion.demo.checker.detect_direction); ``color`` / ``shape`` of the first frame's
  main object when the prompt is a VideoScene.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import permutations
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

from megafusion.demo.captions import parse_caption
from megafusion.demo.checker import DetectedObject, detect_direction, detect_objects, relation
from megafusion.demo.world import COLORS, DIRECTIONS, POSITIONS, RELATIONS, SHAPES, Scene, VideoScene, all_pairs

Metric = Dict[str, Optional[float]]


def metric(hits: Sequence[bool], chances: Sequence[float]) -> Metric:
    """{"accuracy", "chance", "above_chance", "n"} from per-item hits and per-item chance levels."""
    if len(hits) != len(chances):
        raise ValueError(f"hits ({len(hits)}) and chances ({len(chances)}) must have one entry per item")
    n = len(hits)
    if n == 0:
        return {"accuracy": None, "chance": None, "above_chance": None, "n": 0}
    accuracy, chance = sum(map(bool, hits)) / n, sum(chances) / n
    return {"accuracy": accuracy, "chance": chance, "above_chance": accuracy - chance, "n": n}


# ---------------------------------------------------------------------------------------------------- chance
@lru_cache(maxsize=None)
def _random_scenes(n_objects: int) -> Tuple[Tuple[Tuple[str, str], ...], ...]:
    """The uniformly random world scenes' objects: K pairs for one object, the K(K-1) ordered distinct pairs of
    pairs for two (a two-object scene never repeats a (shape, color))."""
    pairs = all_pairs()
    return tuple((p,) for p in pairs) if n_objects == 1 else tuple(permutations(pairs, 2))


@lru_cache(maxsize=None)
def _set_chance(attribute: str, target: FrozenSet, n_objects: int) -> float:
    """P(random scene with `n_objects` objects has exactly the set `target` of `attribute` values)."""
    scenes = _random_scenes(n_objects)
    pick = {"color": lambda objs: frozenset(c for _, c in objs), "shape": lambda objs: frozenset(s for s, _ in objs),
            "object": frozenset}[attribute]
    return sum(pick(objs) == target for objs in scenes) / len(scenes)


def chance_levels() -> Dict[str, float]:
    """Chance of each text-to-image and video metric for the world's vocabulary (caption chances depend on the
    scene: see `_set_chance`)."""
    pair_objects = _set_chance("object", frozenset(all_pairs()[:2]), 2)
    return {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS),
            "object": 1 / (len(COLORS) * len(SHAPES) * len(POSITIONS)), "counting": 1 / 2,
            "pair_objects": pair_objects, "relation": pair_objects / len(RELATIONS),
            "relation_given_objects": 1 / len(RELATIONS), "direction": 1 / len(DIRECTIONS)}


# ---------------------------------------------------------------------------------------------------- text -> image
def _check_items(items, what: str) -> list:
    items = list(items)
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"items[{i}] must be a ({what}) pair, got {type(item).__name__}")
    return items


def _find(detected: Sequence[DetectedObject], shape: str, color: str, used: set) -> Optional[int]:
    for i, d in enumerate(detected):
        if i not in used and d.shape == shape and d.color == color:
            return i
    return None


def score_text_to_image(items: Sequence[Tuple[Scene, object]]) -> Dict[str, Metric]:
    """Per-attribute accuracy of generated images ([H, W, 3] arrays) for their prompt scenes."""
    chance = chance_levels()
    hits: Dict[str, List[bool]] = {k: [] for k in ("color", "shape", "position", "object", "counting",
                                                   "pair_objects", "relation", "relation_given_objects")}
    for i, (scene, image) in enumerate(_check_items(items, "prompt Scene, image")):
        if not isinstance(scene, Scene):
            raise TypeError(f"items[{i}][0] must be a Scene, got {type(scene).__name__}")
        found = detect_objects(image)
        hits["counting"].append(len(found) == len(scene.objects))
        if len(scene.objects) == 1:
            obj, main = scene.objects[0], (found[0] if found else None)
            color = main is not None and main.color == obj.color
            shape = main is not None and main.shape == obj.shape
            position = main is not None and scene.position is not None and main.position == scene.position
            hits["color"].append(color)
            hits["shape"].append(shape)
            hits["position"].append(position)
            hits["object"].append(color and shape and position)
            continue
        a, b = scene.objects
        ia = _find(found, a.shape, a.color, set())
        ib = _find(found, b.shape, b.color, {ia})
        both = ia is not None and ib is not None
        right = both and relation(found[ia], found[ib]) == scene.relation
        hits["pair_objects"].append(both)
        hits["relation"].append(right)
        if both:
            hits["relation_given_objects"].append(right)
    return {k: metric(v, [chance[k]] * len(v)) for k, v in hits.items()}


# ---------------------------------------------------------------------------------------------------- image -> text
def score_image_to_text(items: Sequence[Tuple[Scene, str]]) -> Dict[str, Metric]:
    """Color / shape / object accuracy of generated captions for the scenes they describe."""
    hits: Dict[str, List[bool]] = {"color": [], "shape": [], "object": []}
    chances: Dict[str, List[float]] = {"color": [], "shape": [], "object": []}
    for i, (scene, text) in enumerate(_check_items(items, "true Scene, caption")):
        if not isinstance(scene, Scene):
            raise TypeError(f"items[{i}][0] must be a Scene, got {type(scene).__name__}")
        if not isinstance(text, str):
            raise TypeError(f"items[{i}][1] must be the caption string, got {type(text).__name__}")
        parsed = parse_caption(text)
        truth = {"color": frozenset(o.color for o in scene.objects),
                 "shape": frozenset(o.shape for o in scene.objects),
                 "object": frozenset((o.shape, o.color) for o in scene.objects)}
        said = {"color": frozenset(parsed.colors), "shape": frozenset(parsed.shapes),
                "object": frozenset(parsed.objects)}
        for key in hits:
            hits[key].append(said[key] == truth[key])
            chances[key].append(_set_chance(key, truth[key], len(scene.objects)))
    return {k: metric(hits[k], chances[k]) for k in hits}


# ---------------------------------------------------------------------------------------------------- video
def score_text_to_video(items: Sequence[Tuple[Union[VideoScene, str], Sequence]]) -> Dict[str, Metric]:
    """Fraction of clips (lists of frames) whose main object moves in the prompted direction; with VideoScene
    prompts also the first frame's color and shape."""
    chance = chance_levels()
    hits: Dict[str, List[bool]] = {"direction": [], "color": [], "shape": []}
    for i, (prompt, frames) in enumerate(_check_items(items, "prompt VideoScene or direction, frames")):
        direction = prompt.direction if isinstance(prompt, VideoScene) else prompt
        if direction not in DIRECTIONS:
            raise ValueError(f"items[{i}][0]: direction {direction!r} is not one of {list(DIRECTIONS)}")
        hits["direction"].append(detect_direction(frames) == direction)
        if isinstance(prompt, VideoScene):
            found = detect_objects(frames[0])
            hits["color"].append(bool(found) and found[0].color == prompt.color)
            hits["shape"].append(bool(found) and found[0].shape == prompt.shape)
    return {"direction": metric(hits["direction"], [chance["direction"]] * len(hits["direction"])),
            "color": metric(hits["color"], [chance["color"]] * len(hits["color"])),
            "shape": metric(hits["shape"], [chance["shape"]] * len(hits["shape"]))}
