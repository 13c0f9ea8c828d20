"""The stage skeleton: refusing, replacing and locking run dirs, run.json and what --resume takes from today."""

import subprocess
import sys

import pytest

from tests.train.windows import loop
from yunque.config import LoopConfig, PretrainConfig
from yunque.train.run import FROM_TODAY, LOCK, RUN, claim, lock, record, restore, what_is_in


def test_a_non_empty_dir_is_refused_and_force_replaces_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"already holds 1 file\(s\) \(notes.txt\); pass --resume .* --force"):
        with claim(out, resume=False, force=False):
            pass
    assert (out / "notes.txt").read_text() == "mine"
    with claim(out, resume=False, force=True) as fresh:
        assert fresh and [p.name for p in out.iterdir()] == [LOCK]
    assert list(out.iterdir()) == []  # the lock goes when the run ends


def test_force_never_deletes_what_the_run_reads(tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "corpus.txt").write_text("text")
    with pytest.raises(ValueError, match="--force would delete .*corpus.txt"):
        with claim(out, resume=False, force=True, inputs=[str(out / "data" / "corpus.txt")]):
            pass
    assert (out / "data" / "corpus.txt").read_text() == "text"


def test_a_fresh_run_that_fails_removes_the_dir_it_made(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with claim(out, resume=False, force=False):
            (out / "config.json").write_text("{}")
            raise RuntimeError("tokenizing failed")
    assert not out.exists()


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(ValueError, match="run.json: missing; there is no run to resume"):
        with claim(tmp_path, resume=True, force=False):
            pass


def test_a_second_writer_gets_one_line(tmp_path):
    with lock(tmp_path):
        with pytest.raises(ValueError, match=r"another yunque process \(pid \d+\) is writing to"):
            with lock(tmp_path):
                pass


def test_a_killed_writer_leaves_no_stuck_lock(tmp_path):
    code = ("import os, signal, pathlib; from yunque.train.run import lock\n"
            f"with lock(pathlib.Path({str(tmp_path)!r})):\n    os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == -9
    assert (tmp_path / LOCK).exists()  # the file stays; the kernel released the lock with the process
    with lock(tmp_path):
        pass


def test_resume_restores_the_run_and_takes_only_the_budget_and_cadence_from_today(tmp_path):
    saved = PretrainConfig(out=str(tmp_path), data=("a.txt",), batch_size=3, loop=loop(tmp_path, lr=5e-3))
    record(tmp_path, "pretrain", saved, saved.loop, "abc", {"tokenizer": {"vocab_size": 263}})
    today = LoopConfig(max_steps=40, lr=1.0, checkpoint_every=7, checkpoint_minutes=1.0, progress=False)
    cfg, loop_cfg, run = restore("pretrain", PretrainConfig, tmp_path, today)
    assert cfg.batch_size == 3 and cfg.data == ("a.txt",) and loop_cfg.lr == 5e-3  # the run's own
    assert loop_cfg.max_steps == 40 and loop_cfg.checkpoint_every == 7 and loop_cfg.checkpoint_minutes == 1.0
    assert loop_cfg.resume and set(FROM_TODAY) >= {"max_steps", "minutes", "checkpoint_every", "device"}
    assert run["data_fingerprint"] == "abc" and run["tokenizer"]["vocab_size"] == 263
    with pytest.raises(ValueError, match="holds a pretrain run, not a sft run"):
        restore("sft", PretrainConfig, tmp_path, today)
    assert what_is_in(tmp_path) == "a `yunque pretrain` run with no checkpoint"
    assert (tmp_path / RUN).is_file()
