"""The `yunque` command, in-process through `yunque.cli.main`, end to end on a few KB of Tiny Shakespeare.

Every user error must exit non-zero with exactly one line on stderr that names the problem, and no traceback.
"""

import hashlib
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from yunque.cli import main
from yunque.tokenizer.bpe import load_tokenizer
from yunque.train import loop as train_loop

TRAIN = ["--tokenizer", "bytes", "--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--max-steps", "20",
         "--eval-every", "10", "--no-progress"]
RUN_FILES = {"config.json", "model.safetensors", "tokenizer.json", "train_state.pt", "metrics.jsonl", "loss.png"}


@pytest.fixture(scope="module")
def text(shared_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text((shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(text, tmp_path_factory):
    """A model dir made by `yunque pretrain` (20 steps of the tiny preset on bytes)."""
    out = tmp_path_factory.mktemp("runs") / "R"
    assert main(["pretrain", "--out", str(out), "--data", str(text), *TRAIN]) == 0
    return out


def fails(capsys, argv, *words, code=1):
    """Run the CLI, expect exit `code` and one stderr line holding `words`; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err
    return err


def snapshot(directory):
    return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "yunque", "--help"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert "pretrain" in r.stdout and "generate" in r.stdout


def test_tokenizer_train(text, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(text), "--vocab-size", "300", "--out", str(out)]) == 0
    assert "tokenizer.json (300 tokens)" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert tok.kind == "bpe" and tok.vocab_size == 300
    assert tok.decode(tok.encode("ROMEO: hello")) == "ROMEO: hello"


def test_pretrain_writes_a_model_dir(run):
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    assert json.loads((run / "config.json").read_text())["max_seq_len"] == 32


def test_generate(run, capsys):
    args = ["generate", str(run), "ROMEO:", "--max-new-tokens", "10", "--seed", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded sampling repeats


def test_generate_compiled_equals_eager(run, capsys):
    args = ["generate", str(run), "ROMEO:", "--max-new-tokens", "12", "--temperature", "0", "--precision", "fp32"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--compile"]) == 0
    assert capsys.readouterr().out == eager


def test_generate_stops_at_the_ids_generation_config_names(run, tmp_path, capsys):
    # An imported model names its end-of-sequence ids in generation_config.json (one id or a list)
    args = ["--max-new-tokens", "12", "--temperature", "0", "--precision", "fp32"]
    assert main(["generate", str(run), "ROMEO:", *args]) == 0
    free = capsys.readouterr().out.removesuffix("\n")
    tok = load_tokenizer(run)
    first = tok.encode(free, bos=False)[len(tok.encode("ROMEO:", bos=False))]  # the first generated token
    named = tmp_path / "named"
    shutil.copytree(run, named)
    (named / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.vocab_size + 5, first]}))
    assert main(["generate", str(named), "ROMEO:", *args]) == 0
    assert capsys.readouterr().out == "ROMEO:\n" != free + "\n"
    (named / "generation_config.json").write_text(json.dumps({"eos_token_id": first}))
    assert main(["generate", str(named), "ROMEO:", *args]) == 0
    assert capsys.readouterr().out == "ROMEO:\n"
    (named / "generation_config.json").write_text("{not json")
    fails(capsys, ["generate", str(named), "ROMEO:", *args], "generation_config.json", "not a JSON object")


def test_info(run, capsys):
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "llama-style decoder: 2 layers" in out and "bytes, 263 tokens" in out and "steps=20" in out
    assert main(["info", str(run), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["context"] == 32 and d["training"]["steps"] == 20


def test_perplexity_json(run, text, capsys):
    assert main(["perplexity", str(run), "--data", str(text), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"} <= r.keys()
    assert r["bytes"] == len(text.read_bytes())
    assert r["tokens"] == r["bytes"] + 1  # one per byte, plus BOS
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) * r["tokens"] / r["bytes"])
    assert 0 < r["loss"] < math.log(263)


def test_pretrain_again_without_resume_refuses_and_changes_nothing(run, text, capsys):
    before = snapshot(run)
    fails(capsys, ["pretrain", "--out", str(run), "--data", str(text), *TRAIN], "--resume")
    assert snapshot(run) == before


def test_interrupted_pretrain_resumes_exactly(run, text, tmp_path, capsys, monkeypatch):
    out = tmp_path / "R"
    argv = ["pretrain", "--out", str(out), "--data", str(text), *TRAIN, "--checkpoint-every", "10"]
    real_lr_at = train_loop.lr_at

    def killed_at_step_15(step, **kw):
        if step == 15:
            raise KeyboardInterrupt
        return real_lr_at(step, **kw)

    monkeypatch.setattr(train_loop, "lr_at", killed_at_step_15)
    fails(capsys, argv, "interrupted", code=130)
    monkeypatch.undo()

    # the run's settings (data, seed, batch, budget) come from its run.json, not from today's flags
    assert main(["pretrain", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "for 20 steps" in capsys.readouterr().out
    a, b = load_file(out / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same as the uninterrupted run
    assert (out / "metrics.jsonl").read_text().count("\n") == 2


def test_resume_keeps_the_run_architecture(run, text, tmp_path, capsys):
    """Resuming with other model flags must not rewrite config.json to disagree with the weights."""
    out = tmp_path / "R"
    shutil.copytree(run, out)
    config = (out / "config.json").read_text()
    argv = ["pretrain", "--out", str(out), "--data", str(text), *TRAIN, "--preset", "mini", "--resume"]
    assert main(argv) == 0
    capsys.readouterr()
    assert (out / "config.json").read_text() == config
    assert main(["info", str(out)]) == 0


def test_pretrain_with_muon_records_it_and_resumes_with_it(text, tmp_path, capsys):
    out = tmp_path / "M"
    assert main(["pretrain", "--out", str(out), "--data", str(text), *TRAIN, "--max-steps", "6",
                 "--optimizer", "muon"]) == 0
    assert json.loads((out / "run.json").read_text())["loop"]["optimizer"] == "muon"
    # resuming without the flag restores Muon's state from the checkpoint (an AdamW optimizer would refuse it)
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "8", "--no-progress"]) == 0
    assert "for 8 steps" in capsys.readouterr().out


def test_resume_with_more_steps_extends_the_run(run, tmp_path, capsys):
    out = tmp_path / "R"
    shutil.copytree(run, out)
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "30", "--no-progress"]) == 0
    assert "for 30 steps" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]


def test_resume_without_a_run(tmp_path, capsys):
    fails(capsys, ["pretrain", "--out", str(tmp_path / "R"), "--resume"], "run.json", "without --resume")


# Bad input: each fails with one line naming the problem.

def test_missing_data_path(tmp_path, capsys):
    missing = str(tmp_path / "nope.txt")
    fails(capsys, ["pretrain", "--out", str(tmp_path / "R"), "--data", missing, *TRAIN], missing,
          "no such file")
    assert not (tmp_path / "R").exists()  # a run that fails before training leaves nothing behind
    fails(capsys, ["tokenizer", "train", "--data", missing, "--out", str(tmp_path / "T")], "no such file")


def test_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fails(capsys, ["pretrain", "--out", str(tmp_path / "R"), "--data", str(empty), *TRAIN], "empty")


def test_non_utf8_data_file(tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    fails(capsys, ["pretrain", "--out", str(tmp_path / "R"), "--data", str(latin1), *TRAIN], "not valid UTF-8")


def test_unknown_preset_fails_before_touching_disk(text, tmp_path, capsys):
    argv = ["pretrain", "--out", str(tmp_path / "R"), "--data", str(text), *TRAIN, "--preset", "nope"]
    fails(capsys, argv, "unknown preset 'nope'", "tiny")
    assert not (tmp_path / "R").exists()


def test_bad_model_override(text, tmp_path, capsys):
    argv = ["pretrain", "--out", str(tmp_path / "R"), "--data", str(text), *TRAIN, "--n-head", "0"]
    fails(capsys, argv, "n_head must be positive")


@pytest.mark.parametrize("flags, words", [
    (["--grad-accum", "0"], ["grad_accum must be at least 1"]),
    (["--seq-len", "0"], ["max_seq_len must be positive"]),
])
def test_bad_loop_settings(text, tmp_path, capsys, flags, words):
    fails(capsys, ["pretrain", "--out", str(tmp_path / "R"), "--data", str(text), *TRAIN, *flags], *words)


def damaged_copy(run, tmp_path, damage):
    out = tmp_path / "damaged"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (out / name).write_bytes((run / name).read_bytes())
    damage(out)
    return out


def truncate_weights(d):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])


@pytest.mark.parametrize("damage, words", [
    (truncate_weights, ["model.safetensors", "corrupt or truncated"]),
    (lambda d: (d / "config.json").unlink(), ["config.json: missing"]),
])
@pytest.mark.parametrize("command", [["generate", "{dir}", "ROMEO:", "--max-new-tokens", "3"], ["info", "{dir}"]])
def test_corrupt_model_dir(run, tmp_path, capsys, damage, words, command):
    out = damaged_copy(run, tmp_path, damage)
    fails(capsys, [a.format(dir=out) for a in command], *words)


def test_prompt_longer_than_context(run, capsys):
    fails(capsys, ["generate", str(run), "a" * 100, "--max-new-tokens", "3"], "prompt has 101 tokens",
          "context is 32")


def test_bad_flag_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--out", str(tmp_path / "R"), "--max-steps", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--max-steps" in err and "'abc'" in err
