"""Natural language about the demo's visual world: captions, canonical prompts, text-only documents, and the
parser that reads color and shape words back out of generated text.

- `caption` describes a Scene or VideoScene with one of several templates and synonyms ("a red circle on the
  left", "there is a small red disk at the left side", "red circle, left", "a blue square to the right of a red
  circle", "a blue box moving right"), chosen with a seeded numpy Generator;
- `canonical_caption` is the one fixed wording (first template, first synonym) used for evaluation prompts;
- `world_document` writes text-only documents of facts and example captions in the same vocabulary, so a
  tokenizer trained on the corpus sees every word the captions use (restricted to the allowed (shape, color)
  pairs, so held-out combinations never appear in training text either);
- `parse_caption` finds the named colors, shapes (synonyms and plurals included: "disk" is a circle) and
  color-shape pairs ("red ... disk" within two words) in any text.

Everything is lower case; punctuation is limited to commas, colons and full stops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from megafusion.demo.world import COLORS, DIRECTIONS, INVERSE_RELATION, POSITIONS, RELATIONS, Scene, \
    VideoScene, all_pairs, sample_scene, sample_video

SHAPE_SYNONYMS: Dict[str, Tuple[str, ...]] = {"circle": ("circle", "disk", "disc", "dot"),
                                               "square": ("square", "box", "block"),
                                               "triangle": ("triangle", "wedge")}
SHAPE_PLURALS = {"circle": "circles", "disk": "disks", "disc": "discs", "dot": "dots", "square": "squares",
                 "box": "boxes", "block": "blocks", "triangle": "triangles", "wedge": "wedges"}
SIZE_WORDS = ("", "small ", "little ")
POSITION_PHRASES: Dict[str, Tuple[str, ...]] = {
    "left": ("on the left", "at the left side", "on the left side", "at the left"),
    "right": ("on the right", "at the right side", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "in the upper part", "at the top of the picture"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part", "at the bottom of the picture"),
    "center": ("in the center", "in the middle", "at the center", "in the middle of the picture"),
}
RELATION_PHRASES: Dict[str, Tuple[str, ...]] = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
MOTION_PHRASES: Dict[str, Tuple[str, ...]] = {
    "left": ("moving left", "moving to the left", "sliding left", "going to the left"),
    "right": ("moving right", "moving to the right", "sliding right", "going to the right"),
    "up": ("moving up", "moving upwards", "rising", "going up"),
    "down": ("moving down", "moving downwards", "falling", "going down"),
}
MOTION_ENDS = {"left": ("right", "left"), "right": ("left", "right"), "up": ("bottom", "top"),
               "down": ("top", "bottom")}
SHAPE_FACTS = {"circle": ("are round", "have no corners", "look like a coin"),
               "square": ("have four corners", "have four equal sides", "look like a box"),
               "triangle": ("have three corners", "point up", "have a flat bottom")}
OPPOSITES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "up": "down", "down": "up"}

Described = Union[Scene, VideoScene]

_WORD_TO_SHAPE = {w: s for s, words in SHAPE_SYNONYMS.items() for w in words}
_WORD_TO_SHAPE.update({SHAPE_PLURALS[w]: s for w, s in list(_WORD_TO_SHAPE.items())})


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got "
                        f"{type(rng).__name__}")
    return rng


# ---------------------------------------------------------------------------------------------------- captions
def _single(scene: Scene, rng: Optional[np.random.Generator]) -> str:
    obj = scene.objects[0]
    position = scene.position
    if position is None:
        raise ValueError("scene: a one-object scene needs its position to be captioned")
    if rng is None:
        return f"a {obj.color} {obj.shape} {POSITION_PHRASES[position][0]}"
    shape, size = _choice(rng, SHAPE_SYNONYMS[obj.shape]), _choice(rng, SIZE_WORDS)
    where = _choice(rng, POSITION_PHRASES[position])
    templates = (f"a {obj.color} {shape} {where}",
                 f"there is a {size}{obj.color} {shape} {where}",
                 f"{obj.color} {shape}, {position}",
                 f"an image of a {size}{obj.color} {shape} {where}",
                 f"{where}, a {size}{obj.color} {shape}",
                 f"the {obj.color} {shape} is {where}",
                 f"a picture with one {obj.color} {shape} {where}")
    return _choice(rng, templates)


def _pair(scene: Scene, rng: Optional[np.random.Generator]) -> str:
    a, b = scene.objects
    if rng is None:
        return f"a {a.color} {a.shape} {RELATION_PHRASES[scene.relation][0]} a {b.color} {b.shape}"
    if rng.random() < 0.4:  # the same scene told from the other object
        a, b, rel = b, a, INVERSE_RELATION[scene.relation]
    else:
        rel = scene.relation
    sa, sb = _choice(rng, SHAPE_SYNONYMS[a.shape]), _choice(rng, SHAPE_SYNONYMS[b.shape])
    phrase = _choice(rng, RELATION_PHRASES[rel])
    templates = (f"a {a.color} {sa} {phrase} a {b.color} {sb}",
                 f"there is a {a.color} {sa} {phrase} a {b.color} {sb}",
                 f"two shapes: a {a.color} {sa} {phrase} a {b.color} {sb}",
                 f"a {a.color} {sa} and a {b.color} {sb}, the {a.color} {sa} is {phrase} the {b.color} {sb}",
                 f"{a.color} {sa} {phrase} {b.color} {sb}")
    return _choice(rng, templates)


def _video(video: VideoScene, rng: Optional[np.random.Generator]) -> str:
    if rng is None:
        return f"a {video.color} {video.shape} {MOTION_PHRASES[video.direction][0]}"
    shape, size = _choice(rng, SHAPE_SYNONYMS[video.shape]), _choice(rng, SIZE_WORDS)
    motion = _choice(rng, MOTION_PHRASES[video.direction])
    start, end = MOTION_ENDS[video.direction]
    templates = (f"a {video.color} {shape} {motion}",
                 f"a {size}{video.color} {shape} {motion}",
                 f"{video.color} {shape}, {motion}",
                 f"a video of a {video.color} {shape} {motion}",
                 f"the {video.color} {shape} moves from the {start} to the {end}")
    return _choice(rng, templates)


def caption(item: Described, rng: np.random.Generator) -> str:
    """A varied caption of a Scene (one or two objects) or a VideoScene."""
    _check_rng(rng)
    return _describe(item, rng)


def canonical_caption(item: Described) -> str:
    """The fixed wording of a Scene or VideoScene used as an evaluation prompt: "a red circle on the left",
    "a red circle left of a blue square", "a blue square moving right"."""
    return _describe(item, None)


def _describe(item: Described, rng: Optional[np.random.Generator]) -> str:
    if isinstance(item, VideoScene):
        return _video(item, rng)
    if not isinstance(item, Scene):
        raise TypeError(f"item must be a Scene or a VideoScene, got {type(item).__name__}")
    return _single(item, rng) if len(item.objects) == 1 else _pair(item, rng)


# ---------------------------------------------------------------------------------------------------- documents
def _fact(rng: np.random.Generator, pairs: Sequence[Tuple[str, str]], background: str) -> str:
    shape, color = pairs[int(rng.integers(len(pairs)))]
    kind = int(rng.integers(9))
    if kind == 0:
        return f"{color} {SHAPE_PLURALS[shape]} {_choice(rng, SHAPE_FACTS[shape])}."
    if kind == 1:
        word = _choice(rng, SHAPE_SYNONYMS[shape][1:])
        return f"a {word} is another word for a {shape}, and {SHAPE_PLURALS[word]} are {SHAPE_PLURALS[shape]}."
    if kind == 2:
        return f"the background of every picture is {background}, and each shape has one color."
    if kind == 3:
        names = list(COLORS)
        return f"the colors are {', '.join(names[:-1])} and {names[-1]}; the shapes are circles, squares and " \
               f"triangles."
    if kind == 4:
        other_shape, other_color = pairs[int(rng.integers(len(pairs)))]
        if (other_shape, other_color) == (shape, color):
            return f"two {color} {SHAPE_PLURALS[shape]} can stand side by side."
        rel = _choice(rng, RELATIONS)
        return (f"if a {color} {shape} is {_choice(rng, RELATION_PHRASES[rel])} a {other_color} {other_shape}, "
                f"then the {other_color} {other_shape} is {RELATION_PHRASES[INVERSE_RELATION[rel]][0]} the "
                f"{color} {shape}.")
    if kind == 5:
        position = _choice(rng, POSITIONS)
        return (f"a shape {_choice(rng, POSITION_PHRASES[position])} is at the {position}, "
                + (f"far from the {OPPOSITES[position]}." if position != "center" else "away from every edge."))
    if kind == 6:
        direction = _choice(rng, DIRECTIONS)
        start, end = MOTION_ENDS[direction]
        return (f"a {color} {shape} {_choice(rng, MOTION_PHRASES[direction])} starts near the {start} and ends "
                f"near the {end}; {direction} is the opposite of {OPPOSITES[direction]}.")
    if kind == 7:
        scene = sample_scene(rng, 1 + int(rng.integers(2)), pairs=pairs)
        return f"one picture shows {caption(scene, rng)}."
    return f"in a short video: {caption(sample_video(rng, pairs=pairs), rng)}."


def world_document(rng: np.random.Generator, n_sentences: int = 6,
                   pairs: Optional[Sequence[Tuple[str, str]]] = None, background: str = "white") -> str:
    """A text-only document of `n_sentences` facts and example captions about the world; every (shape, color)
    it names is one of `pairs` (all when None)."""
    _check_rng(rng)
    if not isinstance(n_sentences, (int, np.integer)) or n_sentences < 1:
        raise ValueError(f"n_sentences={n_sentences!r} must be a positive integer")
    pairs = list(all_pairs() if pairs is None else pairs)
    if not pairs:
        raise ValueError("pairs must hold at least one (shape, color) pair")
    return " ".join(_fact(rng, pairs, background) for _ in range(n_sentences))


# ---------------------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class ParsedCaption:
    colors: Tuple[str, ...]  # named colors in order of mention (repeats kept)
    shapes: Tuple[str, ...]  # canonical shapes in order of mention ("disk" -> "circle")
    objects: Tuple[Tuple[str, str], ...]  # (shape, color) where a color word precedes a shape word within 2 words


def words(text: str) -> List[str]:
    return re.findall(r"[a-z]+", text.lower())


def parse_caption(text: str) -> ParsedCaption:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    tokens = words(text)
    colors, shapes, objects = [], [], []
    last_color = None  # (index, color)
    for i, token in enumerate(tokens):
        if token in COLORS:
            colors.append(token)
            last_color = (i, token)
        elif token in _WORD_TO_SHAPE:
            shape = _WORD_TO_SHAPE[token]
            shapes.append(shape)
            if last_color is not None and i - last_color[0] <= 2:
                objects.append((shape, last_color[1]))
                last_color = None
    return ParsedCaption(tuple(colors), tuple(shapes), tuple(objects))


def vocabulary() -> List[str]:
    """Every word a caption can use (sorted)."""
    vocab = set(COLORS) | set(_WORD_TO_SHAPE) | set(POSITIONS) | set(DIRECTIONS)
    for table in (POSITION_PHRASES, RELATION_PHRASES, MOTION_PHRASES):
        for phrases in table.values():
            for phrase in phrases:
                vocab.update(words(phrase))
    vocab.update(words(" ".join(SIZE_WORDS) + " there is a an image of the picture with one two shapes and video "
                             "moves from to"))
    return sorted(vocab)
