"""Captions: variety, determinism, faithfulness (the parser reads back the scene), world documents' coverage."""

import numpy as np
import pytest

from megafusion.demo import captions as cap
from megafusion.demo import world


def _items(seed, n):
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng, 1 + i % 3 // 2) if i % 3 < 2 else world.sample_video(rng) for i in range(n)]


def test_same_seed_same_captions():
    items = _items(0, 60)
    a = [cap.caption(it, np.random.default_rng(1)) for it in items]
    b = [cap.caption(it, np.random.default_rng(1)) for it in items]
    assert a == b
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    assert [cap.caption(it, rng1) for it in items] == [cap.caption(it, rng2) for it in items]


def test_one_scene_gets_many_wordings():
    rng = np.random.default_rng(0)
    single = world.single_object_scene("circle", "red", "left")
    pair = world.two_object_scene(("circle", "red"), "left of", ("square", "blue"))
    video = world.VideoScene("square", "blue", "right", 9, 16, 11, 4.5)
    for item, at_least in ((single, 25), (pair, 25), (video, 15)):
        texts = {cap.caption(item, rng) for _ in range(300)}
        assert len(texts) >= at_least, texts
    singles = {cap.caption(single, rng) for _ in range(300)}
    assert "red circle, left" in singles and any("disk" in t for t in singles) and any("small" in t for t in singles)
    pairs = {cap.caption(pair, rng) for _ in range(300)}
    assert any(t.startswith("a blue") and "right of a red" in t for t in pairs)  # told from the other object


def test_canonical_captions():
    assert cap.canonical_caption(world.single_object_scene("circle", "red", "left")) == "a red circle on the left"
    assert cap.canonical_caption(world.two_object_scene(("circle", "red"), "left of", ("square", "blue"))) == \
        "a red circle left of a blue square"
    assert cap.canonical_caption(world.VideoScene("square", "blue", "right", 9, 16, 11, 4.5)) == \
        "a blue square moving right"


def test_every_caption_names_exactly_its_objects():
    rng = np.random.default_rng(2)
    for item in _items(3, 600):
        text = cap.caption(item, rng)
        parsed = cap.parse_caption(text)
        objects = [(item.shape, item.color)] if isinstance(item, world.VideoScene) else \
            [(o.shape, o.color) for o in item.objects]
        assert set(parsed.objects) == set(objects), text
        assert set(parsed.colors) == {c for _, c in objects} and set(parsed.shapes) == {s for s, _ in objects}


def test_parse_caption_handles_synonyms_plurals_and_distance():
    p = cap.parse_caption("There is a small RED disk at the left side.")
    assert p.colors == ("red",) and p.shapes == ("circle",) and p.objects == (("circle", "red"),)
    p = cap.parse_caption("two blue boxes and a green wedge")
    assert p.objects == (("square", "blue"), ("triangle", "green"))
    p = cap.parse_caption("red, then far far away a circle")
    assert p.colors == ("red",) and p.shapes == ("circle",) and p.objects == ()
    assert cap.parse_caption("nothing to see here") == cap.ParsedCaption((), (), ())


def test_world_documents_cover_the_caption_vocabulary_and_respect_pairs():
    rng = np.random.default_rng(0)
    caption_words = set()
    for item in _items(4, 1500):
        caption_words.update(cap.words(cap.caption(item, rng)))
    assert caption_words <= set(cap.vocabulary())
    allowed = [p for p in world.all_pairs() if p not in {("circle", "yellow"), ("square", "blue")}]
    doc_words = set()
    for _ in range(300):
        doc = cap.world_document(rng, 6, allowed)
        assert doc.count(".") >= 6
        parsed = cap.parse_caption(doc)
        assert ("circle", "yellow") not in parsed.objects and ("square", "blue") not in parsed.objects
        doc_words.update(cap.words(doc))
    assert set(cap.vocabulary()) <= doc_words
    a = cap.world_document(np.random.default_rng(9), 5)
    assert a == cap.world_document(np.random.default_rng(9), 5) != cap.world_document(np.random.default_rng(10), 5)


def test_bad_arguments():
    with pytest.raises(TypeError, match="rng"):
        cap.caption(world.single_object_scene("circle", "red", "left"), 3)
    with pytest.raises(TypeError, match="item"):
        cap.canonical_caption("a red circle")
    with pytest.raises(ValueError, match="n_sentences"):
        cap.world_document(np.random.default_rng(0), 0)
    with pytest.raises(ValueError, match="pairs"):
        cap.world_document(np.random.default_rng(0), 2, [])
