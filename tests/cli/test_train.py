"""`yunque tokenizer train`, `pretrain`, `sft` and `merge`, in-process through `yunque.cli.main`.

Every user error must exit non-zero with exactly one line on stderr that names the problem, and no traceback.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.cli.conftest import TRAIN
from tests.cli.util import fails, snapshot
from yunque.cli import main
from yunque.modeldir import load_model
from yunque.tokenizer.bpe import load_tokenizer
from yunque.train import loop as train_loop

RUN_FILES = {"config.json", "model.safetensors", "tokenizer.json", "train_state.pt", "metrics.jsonl", "loss.png",
             "run.json"}


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
    assert main(["info", str(out)]) == 0  # says how far it got and how to go on
    assert f"status=stopped at step 10 of 20; `yunque pretrain --out {out} --resume` continues it" in \
        capsys.readouterr().out

    # the run's settings (data, seed, batch, budget) come from its run.json, not from today's flags
    assert main(["pretrain", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "for 20 steps" in capsys.readouterr().out
    a, b = load_file(out / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same as the uninterrupted run
    assert (out / "metrics.jsonl").read_text().count("\n") == 2
    assert main(["info", str(out)]) == 0 and "status=finished (pretrain)" in capsys.readouterr().out


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


def test_sft_lora_merge_and_chat(base, chats, tmp_path, capsys, monkeypatch):
    common = ["--data", str(chats), "--max-steps", "6", "--eval-every", "3", "--no-progress", "--batch-size", "4"]
    assert main(["sft", "--model", str(base), "--out", str(tmp_path / "full"), *common]) == 0
    assert "held-out assistant loss" in capsys.readouterr().out
    assert main(["sft", "--model", str(base), "--out", str(tmp_path / "lora"), "--lora", "--lora-rank", "2",
                 *common]) == 0
    assert main(["merge", str(base), str(tmp_path / "lora"), str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    load_model(tmp_path / "merged")

    import io
    import sys
    monkeypatch.setattr(sys, "stdin", io.StringIO("say hola\n/system Be brief.\nsay no\n/save "
                                                  f"{tmp_path / 'conv.jsonl'}\n/reset\n"))
    assert main(["chat", str(tmp_path / "full"), "--max-new-tokens", "5", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant: ") == 2 and "(history cleared)" in out
    saved = json.loads((tmp_path / "conv.jsonl").read_text(encoding="utf-8"))
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant"]

    monkeypatch.setattr(sys, "stdin", io.StringIO("say sí\n"))
    assert main(["chat", str(base), "--adapter", str(tmp_path / "lora"), "--max-new-tokens", "3"]) == 0


def test_sft_bad_input(base, chats, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}]}\n{not json\n')
    assert main(["sft", "--model", str(base), "--data", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and len(err.strip().splitlines()) == 1
    weird = tmp_path / "weird.jsonl"
    weird.write_text('{"messages": [{"role": "wizard", "content": "a"}]}\n')
    assert main(["sft", "--model", str(base), "--data", str(weird), "--out", str(tmp_path / "o")]) == 1
    assert "system, user, assistant" in capsys.readouterr().err
    assert main(["sft", "--model", str(base), "--data", str(chats), "--out", str(tmp_path / "o"), "--lora",
                 "--lora-targets", "nope"]) == 1
    assert "qkv" in capsys.readouterr().err


@pytest.mark.parametrize("minutes", ["inf", "nan", "-1"])
def test_impossible_minutes_are_one_line(text, tmp_path, capsys, minutes):
    fails(capsys, ["pretrain", "--out", str(tmp_path / "R"), "--data", str(text), "--minutes", minutes,
                   "--tokenizer", "bytes"], "minutes")
    assert not (tmp_path / "R").exists()


def test_a_corrupt_gz_is_one_line_naming_it(text, tmp_path, capsys):
    import gzip

    data = tmp_path / "corpus.txt.gz"
    data.write_bytes(gzip.compress(text.read_bytes())[:300])  # cut short
    fails(capsys, ["pretrain", "--out", str(tmp_path / "R"), "--data", str(data), *TRAIN], str(data),
          "corrupt or truncated")
    records = tmp_path / "records.jsonl.gz"
    records.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    fails(capsys, ["pretrain", "--out", str(tmp_path / "R"), "--data", str(records), *TRAIN], str(records))


def test_nothing_is_overwritten_without_force(run, text, base, chats, tmp_path, capsys):
    """pretrain over an imported or merged model, sft over a model, tokenizer train over a tokenizer, merge over
    a model: each refuses and leaves the files as they were; --force replaces."""
    model = tmp_path / "model"
    shutil.copytree(base, model)
    before = snapshot(model)
    fails(capsys, ["pretrain", "--out", str(model), "--data", str(text), *TRAIN], "already holds a model",
          "--force")
    fails(capsys, ["sft", "--model", str(base), "--data", str(chats), "--out", str(model), "--no-progress"],
          "already holds a model")
    fails(capsys, ["tokenizer", "train", "--data", str(text), "--vocab-size", "300", "--out", str(model)],
          "already exists", "--force")
    fails(capsys, ["merge", str(base), str(run), str(model)], "already exists", "--force")
    assert snapshot(model) == before
    fails(capsys, ["sft", "--model", str(model), "--data", str(chats), "--out", str(model), "--force"],
          "this run reads from")  # --force never deletes the run's own input
    assert snapshot(model) == before
    assert main(["pretrain", "--out", str(model), "--data", str(text), *TRAIN, "--force"]) == 0
    assert json.loads((model / "run.json").read_text())["stage"] == "pretrain"


def test_a_second_process_on_the_same_run_dir_gets_one_line(run, capsys):
    from yunque.train.run import lock

    with lock(run):  # as if another yunque process were training in it
        fails(capsys, ["pretrain", "--out", str(run), "--resume", "--no-progress"], "another yunque process",
              str(run))


def test_resume_says_which_flags_it_ignores(run, tmp_path, capsys):
    out = tmp_path / "R"
    shutil.copytree(run, out)
    assert main(["pretrain", "--out", str(out), "--resume", "--lr", "0.5", "--batch-size", "99",
                 "--checkpoint-every", "5", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--batch-size, --lr ignored with --resume" in err and "checkpoint-every" not in err


def test_a_short_fp32_budget_trains_the_short_run_recipe(text, tmp_path, capsys):
    out = tmp_path / "R"
    assert main(["pretrain", "--out", str(out), "--data", str(text), "--tokenizer", "bytes", "--minutes", "0.03",
                 "--precision", "fp32", "--batch-size", "4", "--no-progress"]) == 0
    assert "budget in fp32 on this CPU trains with" in capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_layer"], cfg["d_ff"], cfg["n_kv_head"], cfg["max_seq_len"], cfg["d_model"]) == (2, 256, 2, 64, 128)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["batch_size"] == 4 and run["loop"]["lr"] == 2e-3  # the flag given wins; the rest chosen


def test_a_bf16_budget_keeps_the_preset(text):
    from yunque.cli.train import with_short_run_choice
    from yunque.config import LoopConfig, PretrainConfig

    cfg = PretrainConfig(out="R", data=(str(text),), loop=LoopConfig(minutes=0.3, precision="bf16"))
    assert with_short_run_choice(cfg, set()) == cfg
