"""Pretraining as a stage: killed at random moments it resumes to the same weights; data changes are noticed;
run.json records what a resume needs."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from yunque.config import LoopConfig, PretrainConfig
from yunque.data.shards import load_manifest
from yunque.train.pretrain import main

FLAGS = ["--tokenizer", "bytes", "--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--max-steps", "40",
         "--eval-every", "20", "--checkpoint-every", "3", "--precision", "fp32", "--compile", "off", "--threads", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def text(shared_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text((shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:30000], encoding="utf-8")
    return path


def pretrain(out, text, *extra):
    return subprocess.Popen([sys.executable, "-m", "yunque", "pretrain", "--out", str(out), "--data", str(text),
                             *FLAGS, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def continue_run(out, text):
    """Resume the run in `out`, or start it if it was killed before it wrote run.json."""
    return pretrain(out, text, "--resume") if (out / "run.json").is_file() else pretrain(out, text)


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(text, tmp_path):
    """benchmarks/kill_resume.py does this 20 times; here three kills, at moments drawn from the run's span."""
    whole = pretrain(tmp_path / "whole", text)
    start = time.perf_counter()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    span = time.perf_counter() - start
    out, rng = tmp_path / "killed", random.Random(0)
    for _ in range(3):
        p = continue_run(out, text)
        time.sleep(rng.uniform(0.3, 1.0) * span)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    last = continue_run(out, text)
    assert last.wait(timeout=300) == 0, last.stderr.read()
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not list(out.glob("*.yunque-tmp")) and not (out / ".renames.json").exists()


def test_sigterm_saves_a_checkpoint_that_resume_continues(text, tmp_path):
    out = tmp_path / "run"
    p = pretrain(out, text, "--max-steps", "100000", "--checkpoint-every", "0")
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else "slow"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 130
    err = p.stderr.read()
    assert "saved a checkpoint at step" in err and "--resume continues it" in err
    step = json.loads((out / "run.json").read_text()) and load_file(out / "model.safetensors")
    assert step and (out / "train_state.pt").is_file()


def small(out, data, **kw):
    loop = LoopConfig(**{"max_steps": 4, "precision": "fp32", "compile": "off", "eval_every": 0, "progress": False,
                         **kw.pop("loop", {})})
    return PretrainConfig(out=str(out), data=(str(data),), tokenizer="bytes", preset="tiny", seq_len=16, batch_size=2,
                          loop=loop, **kw)


def test_edited_data_is_noticed(text, tmp_path):
    """Shards are keyed by the data's content: editing the file retokenizes, and resuming over it is refused."""
    data = tmp_path / "corpus.txt"
    data.write_text(text.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    main(small(tmp_path / "a", data))
    before = load_manifest(tmp_path / "a" / "data")
    data.write_text(text.read_text(encoding="utf-8")[8000:16000], encoding="utf-8")
    with pytest.raises(ValueError, match="the training data changed since the run"):
        main(small(tmp_path / "a", data, loop={"resume": True, "max_steps": 6}))
    main(small(tmp_path / "a", data, force=True))
    assert load_manifest(tmp_path / "a" / "data")["source"] != before["source"]
    data.write_text(text.read_text(encoding="utf-8")[:8000], encoding="utf-8")  # back as it was
    (tmp_path / "moved").mkdir()
    moved = tmp_path / "moved" / "corpus.txt"
    data.rename(moved)
    main(small(tmp_path / "b", moved))
    assert load_manifest(tmp_path / "b" / "data")["source"] == before["source"]  # content, not the path


def test_whitespace_only_data_is_an_empty_corpus(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n\n")
    with pytest.raises(ValueError, match="the corpus is empty"):
        main(small(tmp_path / "r", blank))
    assert not (tmp_path / "r").exists()


def test_run_json_keeps_absolute_paths_and_the_real_vocabulary(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text(text.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    main(PretrainConfig(out="r", data=("c.txt",), tokenizer="bytes", preset="tiny", seq_len=16, batch_size=2,
                        vocab_size=4096, loop=LoopConfig(max_steps=2, progress=False, eval_every=0)))
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["config"]["data"] == [str(tmp_path / "c.txt")]
    assert run["tokenizer"] == {"kind": "bytes", "vocab_size": 263}  # not the 4096 asked for a BPE
    monkeypatch.chdir(tmp_path / "r")  # resume from elsewhere: the data is still found
    assert main(PretrainConfig(out=str(tmp_path / "r"), loop=LoopConfig(max_steps=3, resume=True,
                                                                          progress=False)))["steps"] == 3
