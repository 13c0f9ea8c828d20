"""Atomic writes: a kill at any moment leaves the old files or the new ones, never a mix, and no debris."""

import json
import os

import pytest

from yunque.atomic import JOURNAL, TMP, atomic_write, atomic_write_all, recover


def writer(text):
    return lambda p: p.write_text(text)


def test_group_write_replaces_all_files(tmp_path):
    atomic_write_all([(tmp_path / "a", writer("a1")), (tmp_path / "b", writer("b1"))])
    atomic_write_all([(tmp_path / "a", writer("a2")), (tmp_path / "b", writer("b2"))])
    assert (tmp_path / "a").read_text() == "a2" and (tmp_path / "b").read_text() == "b2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no journal, no temporary files


def test_a_kill_between_the_renames_is_finished_by_recover(tmp_path):
    """The state a SIGKILL after the first of two renames leaves: b renamed, a still under its temporary name."""
    atomic_write_all([(tmp_path / "a", writer("a1")), (tmp_path / "b", writer("b1"))])
    (tmp_path / ("a" + TMP)).write_text("a2")
    (tmp_path / "b").write_text("b2")
    (tmp_path / JOURNAL).write_text(json.dumps([["a" + TMP, "a"], ["b" + TMP, "b"]]))
    assert recover(tmp_path)
    assert (tmp_path / "a").read_text() == "a2" and (tmp_path / "b").read_text() == "b2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_kill_while_writing_leaves_the_old_files_and_recover_removes_the_debris(tmp_path):
    atomic_write_all([(tmp_path / "a", writer("a1")), (tmp_path / "b", writer("b1"))])
    (tmp_path / ("a" + TMP)).write_text("a2 half")  # no journal yet: the writes never finished
    (tmp_path / "user-notes.tmp").write_text("mine")  # not ours: left alone
    assert not recover(tmp_path)
    assert (tmp_path / "a").read_text() == "a1" and (tmp_path / "b").read_text() == "b1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "user-notes.tmp"]


def test_a_failed_write_leaves_the_old_files_and_no_temporary_ones(tmp_path):
    atomic_write_all([(tmp_path / "a", writer("a1")), (tmp_path / "b", writer("b1"))])

    def full_disk(p):
        p.write_text("b2 half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write_all([(tmp_path / "a", writer("a2")), (tmp_path / "b", full_disk)])
    assert (tmp_path / "a").read_text() == "a1" and (tmp_path / "b").read_text() == "b1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    with pytest.raises(OSError):
        atomic_write(tmp_path / "c", full_disk)
    assert not (tmp_path / "c").exists() and not (tmp_path / ("c" + TMP)).exists()


def test_files_of_two_directories_are_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="one directory"):
        atomic_write_all([(tmp_path / "a", writer("a")), (tmp_path / "d" / "b", writer("b"))])
    assert not os.listdir(tmp_path / "d")
