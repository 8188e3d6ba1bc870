"""The visual world: deterministic rendering, distinguishable shapes and colors, valid placements, videos."""

import numpy as np
import pytest

from megafusion.demo import world
from megafusion.demo.checker import hue


def _scenes(seed, n, **kw):
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng, 1 + i % 2, **kw) for i in range(n)]


def test_same_seed_same_pixels_other_seed_other_pixels():
    a = [world.render(s) for s in _scenes(3, 20)]
    b = [world.render(s) for s in _scenes(3, 20)]
    c = [world.render(s) for s in _scenes(4, 20)]
    assert all(x.dtype == np.uint8 and x.shape == (32, 32, 3) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sum(not np.array_equal(x, y) for x, y in zip(a, c)) >= 18


def test_colors_are_well_separated():
    rgb = np.array(list(world.COLORS.values()), dtype=float)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert len(world.COLORS) >= 6
    assert dist[~np.eye(len(rgb), dtype=bool)].min() > 100
    h = np.sort(hue(rgb))
    gaps = np.diff(np.concatenate([h, [h[0] + 360]]))
    assert gaps.min() > 40


def test_shapes_have_their_own_area_and_outline():
    areas = {}
    masks = {}
    for shape in world.SHAPES:
        scene = world.Scene((world.SceneObject(shape, "red", 16, 16, 12),))
        img = world.render(scene)
        mask = np.all(img == world.COLORS["red"], axis=-1)
        assert np.all(img[~mask] == 255)  # plain white background, hard edges
        ys, xs = np.nonzero(mask)
        assert xs.max() - xs.min() + 1 in (11, 12, 13) and ys.max() - ys.min() + 1 in (11, 12, 13)
        areas[shape], masks[shape] = mask.sum() / 144, mask
    assert areas["square"] == pytest.approx(1.0, abs=0.05)
    assert areas["circle"] == pytest.approx(np.pi / 4, abs=0.06)
    assert areas["triangle"] == pytest.approx(0.5, abs=0.08)
    tri = masks["triangle"]
    rows = tri.sum(axis=1)[tri.any(axis=1)]
    assert rows[0] < rows[-1] / 3  # apex up


def test_objects_stay_inside_and_two_objects_never_touch():
    for scene in _scenes(5, 300):
        n = scene.image_size
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 and 0 <= y0 and x1 <= n and y1 <= n
            assert 0.3 * n <= o.size <= 0.41 * n
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a != b and (a.shape, a.color) != (b.shape, b.color)
            gap = max(b.box[0] - a.box[2], a.box[0] - b.box[2], b.box[1] - a.box[3], a.box[1] - b.box[3])
            assert gap >= 3.0
            img = world.render(scene)
            for o in scene.objects:
                assert np.all(img == world.COLORS[o.color], axis=-1).sum() > 40


def test_single_objects_sit_at_their_named_position():
    for scene in _scenes(6, 100):
        if len(scene.objects) == 1:
            ax, ay = world.POSITION_ANCHORS[scene.position]
            o = scene.objects[0]
            assert abs(o.cx - ax * 32) <= world.JITTER * 32 + 1e-9 and abs(o.cy - ay * 32) <= world.JITTER * 32 + 1e-9


def test_relations_place_objects_accordingly():
    for rel, check in (("left of", lambda a, b: a.cx < b.cx), ("right of", lambda a, b: a.cx > b.cx),
                       ("above", lambda a, b: a.cy < b.cy), ("below", lambda a, b: a.cy > b.cy)):
        scene = world.two_object_scene(("circle", "red"), rel, ("square", "blue"), rng=np.random.default_rng(0))
        assert check(*scene.objects) and scene.relation == rel


def test_larger_images_and_grey_background():
    scene = world.single_object_scene("square", "green", "top", image_size=64, background="light grey")
    img = world.render(scene)
    assert img.shape == (64, 64, 3) and tuple(img[0, 0]) == world.BACKGROUNDS["light grey"]
    assert np.all(img == world.COLORS["green"], axis=-1)[:32].sum() > 300


def test_videos_move_the_shape_in_their_direction_inside_the_frame():
    rng = np.random.default_rng(8)
    for i in range(40):
        video = world.sample_video(rng, n_frames=3 + i % 3)
        frames = world.render_video(video)
        assert len(frames) == video.n_frames
        centres = []
        for f in frames:
            ys, xs = np.nonzero(np.all(f == world.COLORS[video.color], axis=-1))
            assert xs.min() >= 0 and xs.max() < 32 and ys.max() < 32
            centres.append(((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2))
        dx, dy = np.subtract(centres[-1], centres[0])
        expected = {"right": dx > 8, "left": dx < -8, "down": dy > 8, "up": dy < -8}[video.direction]
        assert expected, (video, centres)
        for s in video.frame_scenes():
            x0, y0, x1, y1 = s.objects[0].box
            assert x0 >= 0 and y0 >= 0 and x1 <= 32 and y1 <= 32


def test_round_trip_through_dicts():
    for scene in _scenes(9, 10):
        assert world.Scene.from_dict(scene.to_dict()) == scene
    video = world.sample_video(np.random.default_rng(1))
    assert world.VideoScene.from_dict(video.to_dict()) == video


@pytest.mark.parametrize("call, word", [
    (lambda: world.SceneObject("hexagon", "red", 1, 1, 5), "shape"),
    (lambda: world.SceneObject("circle", "purple", 1, 1, 5), "color"),
    (lambda: world.single_object_scene("circle", "red", "middle"), "position"),
    (lambda: world.two_object_scene(("circle", "red"), "near", ("square", "red")), "relation"),
    (lambda: world.two_object_scene(("circle", "red"), "above", ("circle", "red")), "must differ"),
    (lambda: world.single_object_scene("circle", "red", "left", image_size=8), "size"),
    (lambda: world.sample_video(np.random.default_rng(0), n_frames=1), "n_frames"),
    (lambda: world.sample_scene(np.random.default_rng(0), 3), "n_objects"),
    (lambda: world.sample_scene(np.random.default_rng(0), 2, pairs=[("circle", "red")]), "pairs"),
])
def test_bad_arguments_are_named(call, word):
    with pytest.raises(ValueError, match=word):
        call()
