"""`yunque speedrun`'s flags map onto SpeedrunConfig, and bad values are one line before anything is written."""

import pytest

from tests.cli.util import fails
from yunque.cli import main


@pytest.mark.parametrize("flags, words", [
    (["--minutes", "0"], ["minutes"]),
    (["--sft-minutes", "nan"], ["sft_minutes"]),
    (["--vocab-size", "3"], ["vocab_size"]),
])
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    fails(capsys, ["speedrun", "--out", str(out), *flags], *words)
    assert not out.exists()


def test_an_existing_output_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(capsys, ["speedrun", "--out", str(out), "--minutes", "0.01"], "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["speedrun", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text.lower() and "--sft-minutes" in text and "--force" in text
