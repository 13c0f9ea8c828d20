"""Import/export outputs: an existing one is refused unless forced, and a failure leaves no partial output."""

import pytest

from yunque.outputs import check_output, staged_dir


def test_what_may_be_written_without_force(tmp_path):
    check_output(tmp_path / "new", force=False)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", force=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    for out, kind in (("full", "a non-empty directory"), ("file", "a file")):
        with pytest.raises(ValueError, match=f"^{tmp_path / out} already exists \\({kind}\\); pass --force to "
                                             f"replace it, or choose another output$"):
            check_output(tmp_path / out, force=False)
        check_output(tmp_path / out, force=True)


def test_the_input_is_never_the_output_even_with_force(tmp_path):
    (tmp_path / "model").mkdir()
    for out in (tmp_path / "model", tmp_path):
        with pytest.raises(ValueError, match=f"{out} holds the input {tmp_path / 'model'}; write the output"):
            check_output(out, force=True, sources=(tmp_path / "model",))
    check_output(tmp_path / "model" / "export", force=False, sources=(tmp_path / "model",))


def test_a_staged_output_appears_whole(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out, force=False) as staging:
        (staging / "a").write_text("a")
        assert not out.exists()  # nothing at the output until the block completes
    assert [p.name for p in out.iterdir()] == ["a"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failure_leaves_the_old_output_and_no_partial_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError, match="killed"), staged_dir(out, force=True) as staging:
        (staging / "new").write_text("half")
        raise RuntimeError("killed")
    assert [p.name for p in out.iterdir()] == ["old"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_replaces_the_old_output_once_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(ValueError, match="pass --force"), staged_dir(out, force=False):
        pytest.fail("refused before anything is written")
    with staged_dir(out, force=True) as staging:
        (staging / "new").write_text("new")
        assert (out / "old").is_file()
    assert [p.name for p in out.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["out"]
