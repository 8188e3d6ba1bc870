"""Scoring on hand-made cases: perfect, one attribute wrong, missing / extra objects, swapped relations, captions
with synonyms, videos forwards and backwards, and the chance levels."""

import json
from math import comb

import numpy as np
import pytest

from megafusion.demo import scoring, world

RED_CIRCLE_LEFT = world.single_object_scene("circle", "red", "left")
PAIR = world.two_object_scene(("circle", "red"), "left of", ("square", "blue"))
BLANK = np.full((32, 32, 3), 255, np.uint8)


def acc(result, key):
    return result[key]["accuracy"]


def test_perfect_images_score_one():
    scenes = [world.single_object_scene(s, c, p) for s, c, p in
              (("circle", "red", "left"), ("square", "cyan", "top"), ("triangle", "yellow", "center"))] + [PAIR]
    result = scoring.score_text_to_image([(s, world.render(s)) for s in scenes])
    for key in ("color", "shape", "position", "object", "counting", "pair_objects", "relation",
                "relation_given_objects"):
        assert acc(result, key) == 1.0, key
    assert result["color"]["n"] == 3 and result["counting"]["n"] == 4 and result["relation"]["n"] == 1
    assert result["color"]["above_chance"] == pytest.approx(1 - 1 / 6)
    json.dumps(result)  # plain, ready for metrics.json


def test_each_attribute_is_judged_on_its_own():
    wrong_color = world.render(world.single_object_scene("circle", "blue", "left"))
    wrong_shape = world.render(world.single_object_scene("triangle", "red", "left"))
    wrong_place = world.render(world.single_object_scene("circle", "red", "bottom"))
    extra = world.render(world.two_object_scene(("circle", "red"), "left of", ("triangle", "green")))
    items = [(RED_CIRCLE_LEFT, img) for img in (wrong_color, wrong_shape, wrong_place, BLANK, extra)]
    result = scoring.score_text_to_image(items)
    assert acc(result, "color") == pytest.approx(3 / 5)  # all but wrong_color and blank
    assert acc(result, "shape") == pytest.approx(3 / 5)
    assert acc(result, "position") == pytest.approx(3 / 5)
    assert acc(result, "object") == pytest.approx(1 / 5)  # only `extra`: its largest object (main) is the circle
    assert acc(result, "counting") == pytest.approx(3 / 5)  # blank finds 0, extra finds 2
    assert result["relation"]["n"] == 0 and result["relation"]["accuracy"] is None


def test_pair_prompts_separate_objects_from_relation():
    swapped = world.two_object_scene(("circle", "red"), "right of", ("square", "blue"))
    other = world.two_object_scene(("circle", "red"), "left of", ("square", "green"))
    result = scoring.score_text_to_image([(PAIR, world.render(PAIR)), (PAIR, world.render(swapped)),
                                          (PAIR, world.render(other)), (PAIR, BLANK)])
    assert acc(result, "pair_objects") == pytest.approx(2 / 4)
    assert acc(result, "relation") == pytest.approx(1 / 4)
    assert acc(result, "relation_given_objects") == pytest.approx(1 / 2)
    assert result["relation_given_objects"]["n"] == 2
    assert acc(result, "counting") == pytest.approx(3 / 4)
    assert result["color"]["n"] == 0


def test_chance_levels():
    chance = scoring.chance_levels()
    k = len(world.COLORS) * len(world.SHAPES)
    assert chance["color"] == pytest.approx(1 / 6) and chance["shape"] == pytest.approx(1 / 3)
    assert chance["position"] == pytest.approx(1 / 5) and chance["counting"] == 0.5
    assert chance["pair_objects"] == pytest.approx(1 / comb(k, 2))
    assert chance["relation"] == pytest.approx(1 / comb(k, 2) / 4)
    assert chance["relation_given_objects"] == 0.25 and chance["direction"] == 0.25


def test_random_scenes_score_near_chance():
    """A 'model' that ignores its prompt (renders a random scene) scores the chance level."""
    rng = np.random.default_rng(0)
    items = [(world.sample_scene(rng, 1), world.render(world.sample_scene(rng, 1))) for _ in range(400)]
    result = scoring.score_text_to_image(items)
    for key in ("color", "shape", "position"):
        assert abs(acc(result, key) - result[key]["chance"]) < 0.06, (key, result[key])


def test_captions_with_synonyms_and_exact_sets():
    pair_truth = world.two_object_scene(("circle", "red"), "above", ("circle", "blue"))
    items = [(RED_CIRCLE_LEFT, "there is a small red disk at the left side"),
             (RED_CIRCLE_LEFT, "a blue circle"),
             (RED_CIRCLE_LEFT, "a red circle and a blue square"),  # names a color and shape too many
             (RED_CIRCLE_LEFT, "red dots"),
             (pair_truth, "a blue disc under a red circle")]
    result = scoring.score_image_to_text(items)
    assert acc(result, "color") == pytest.approx(3 / 5)
    assert acc(result, "shape") == pytest.approx(4 / 5)
    assert acc(result, "object") == pytest.approx(3 / 5)
    # chance: one object 1/6, 1/3, 1/18; the pair (colors {red, blue}, shapes {circle}) by enumerating the world
    k = 18
    pair_color = 2 * 3 * 3 / (k * (k - 1))  # ordered (red x, blue y) or (blue y, red x)
    pair_shape = 6 * 5 / (k * (k - 1))  # two circles of different colors
    pair_object = 2 / (k * (k - 1))
    assert result["color"]["chance"] == pytest.approx((4 / 6 + pair_color) / 5)
    assert result["shape"]["chance"] == pytest.approx((4 / 3 + pair_shape) / 5)
    assert result["object"]["chance"] == pytest.approx((4 / 18 + pair_object) / 5)


def test_videos_forwards_and_backwards():
    rng = np.random.default_rng(1)
    videos = [world.sample_video(rng, direction=d) for d in world.DIRECTIONS]
    forwards = [(v, world.render_video(v)) for v in videos]
    backwards = [(v.direction, world.render_video(v)[::-1]) for v in videos]
    result = scoring.score_text_to_video(forwards + backwards)
    assert acc(result, "direction") == pytest.approx(0.5)
    assert result["direction"]["chance"] == 0.25 and result["direction"]["n"] == 8
    assert acc(result, "color") == 1.0 and acc(result, "shape") == 1.0 and result["color"]["n"] == 4
    still = scoring.score_text_to_video([("left", [BLANK] * 4)])
    assert acc(still, "direction") == 0.0 and still["color"]["n"] == 0


def test_bad_items_are_named():
    with pytest.raises(ValueError, match=r"items\[0\]"):
        scoring.score_text_to_image([RED_CIRCLE_LEFT])
    with pytest.raises(TypeError, match=r"items\[0\]\[0\]"):
        scoring.score_text_to_image([("a red circle", BLANK)])
    with pytest.raises(TypeError, match=r"items\[0\]\[1\]"):
        scoring.score_image_to_text([(RED_CIRCLE_LEFT, None)])
    with pytest.raises(ValueError, match="direction"):
        scoring.score_text_to_video([("sideways", [BLANK, BLANK])])
    with pytest.raises(ValueError, match="one entry per item"):
        scoring.metric([True], [0.5, 0.5])
