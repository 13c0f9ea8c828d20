"""The `yunque` command as a whole: entry point, one-line errors for bad flags, suggestions for typos."""

import subprocess
import sys

import pytest

from yunque.cli import main


def test_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "yunque", "--help"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert "pretrain" in r.stdout and "generate" in r.stdout


def test_bad_flag_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--out", str(tmp_path / "R"), "--max-steps", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--max-steps" in err and "'abc'" in err
