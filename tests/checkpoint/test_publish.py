"""The on-disk publication protocol, single process (no megatron): keep-last-K, `latest`, partial folders never
loaded, stale staging folders cleaned, explicit load paths validated."""

import pytest

from megafusion.checkpoint import publish
from megafusion.checkpoint.publish import (COMPLETE_MARKER, LATEST_FILE, find_latest, iter_dirname, list_published,
                                           resolve_load_dir)


def _save(root, step, keep_last=2, payload="x"):
    staging = publish.stage(root, step)
    (staging / "shard.bin").write_text(payload)
    return publish.publish(root, step, keep_last, marker={"note": "test"})


def test_publish_renames_marks_and_points_latest(tmp_path):
    final = _save(tmp_path, 5)
    assert final == tmp_path / "iter_0000005"
    assert (final / COMPLETE_MARKER).is_file() and (final / "shard.bin").read_text() == "x"
    assert publish.read_marker(final)["step"] == 5
    assert (tmp_path / LATEST_FILE).read_text().strip() == "iter_0000005"
    assert not list(tmp_path.glob("tmp.*")) and not list(tmp_path.glob(".latest*"))
    assert find_latest(tmp_path) == final and resolve_load_dir("auto", tmp_path) == final


def test_keep_last_k_deletes_only_after_publishing(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for _, p in list_published(tmp_path)] == ["iter_0000003", "iter_0000004"]
    _save(tmp_path, 5, keep_last=3)
    assert [s for s, _ in list_published(tmp_path)] == [3, 4, 5]
    assert not list(tmp_path.glob("tmp.*"))


def test_partial_checkpoints_are_never_loaded(tmp_path):
    good = _save(tmp_path, 2)
    # a crashed save: a staging folder with data, and a newer iter_ folder without its marker
    (tmp_path / "tmp.iter_0000003").mkdir()
    (tmp_path / "tmp.iter_0000003" / "shard.bin").write_text("half")
    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / "iter_0000004" / "shard.bin").write_text("half")
    assert find_latest(tmp_path) == good
    # `latest` pointing at the incomplete folder (hand-edited, or a corrupted store) falls back to a complete one
    (tmp_path / LATEST_FILE).write_text("iter_0000004\n")
    assert find_latest(tmp_path) == good
    # `latest` missing (crash between the rename and the `latest` write): the newest complete folder
    (tmp_path / LATEST_FILE).unlink()
    assert resolve_load_dir("auto", tmp_path) == good
    for partial in ("tmp.iter_0000003", "iter_0000004"):
        with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
            resolve_load_dir(str(tmp_path / partial), tmp_path)
    assert resolve_load_dir(str(tmp_path), None) == good  # a root folder resolves through `latest`/scan


def test_stale_staging_folders_are_cleaned_on_the_next_save(tmp_path):
    _save(tmp_path, 1)
    stale = tmp_path / "tmp.iter_0000002"
    stale.mkdir()
    (stale / "shard.bin").write_text("from a killed run")
    _save(tmp_path, 3)
    assert not stale.exists()
    assert [s for s, _ in list_published(tmp_path)] == [1, 3]


def test_resaving_a_published_step_replaces_it(tmp_path):
    _save(tmp_path, 7, payload="old")
    final = _save(tmp_path, 7, payload="new")
    assert (final / "shard.bin").read_text() == "new"
    assert [s for s, _ in list_published(tmp_path)] == [7] and not list(tmp_path.glob("tmp.*"))


def test_fresh_start_and_names(tmp_path):
    assert resolve_load_dir("auto", tmp_path / "nothing") is None
    assert resolve_load_dir("none", tmp_path) is None
    assert iter_dirname(42) == "iter_0000042"
    with pytest.raises(ValueError):
        publish.publish(tmp_path, 1, keep_last=0, marker={})
