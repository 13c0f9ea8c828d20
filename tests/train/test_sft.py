"""Supervised fine-tuning on GSM8K questions: held-out assistant loss falls; LoRA writes adapters, leaves the
base alone, merges to the same model, resumes."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from yunque.config import ModelConfig
from yunque.data.loaders import TokenWindows
from yunque.model.gpt import GPT
from yunque.model.lora import LoraConfig, attach_lora, load_adapter, load_lora
from yunque.modeldir import WEIGHTS, load_model, save_model
from yunque.tokenizer.bpe import byte_tokenizer
from yunque.train.checkpoint import TRAINABLE
from yunque.train.loop import LoopConfig, fit
from yunque.train.sft import SFTConfig, main, merge, sft_loss

SEQ = 320


@pytest.fixture(scope="module")
def base(shared_data, tmp_path_factory):
    """A tiny model with yunque's byte tokenizer (chat tokens included), pretrained for 40 steps on Shakespeare.

    From random init LoRA could barely move the loss: the frozen tied embeddings (std 0.02) cap the logits."""
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=SEQ))
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    windows = TokenWindows([np.asarray(tok.encode(text), dtype=np.int64)])
    path = tmp_path_factory.mktemp("base")
    fit(model, lambda i: windows.sample(8, 128, seed=0, step=i), sft_loss,
        LoopConfig(out_dir=str(path / "pretrain"), max_steps=40, lr=1e-2, warmup_steps=3, precision="fp32",
                   eval_every=0, progress=False))
    save_model(path, model, tok)
    return path


@pytest.fixture(scope="module")
def gsm8k(shared_data, tmp_path_factory):
    """The first 64 GSM8K test questions."""
    lines = (shared_data / "gsm8k/test.jsonl").read_text(encoding="utf-8").splitlines()[:64]
    path = tmp_path_factory.mktemp("data") / "gsm8k64.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sft(base, data, out, *, lora=None, steps=30, lr=3e-3, resume=False, **kw):
    loop = LoopConfig(out_dir=str(out), max_steps=steps, lr=lr, warmup_steps=3, weight_decay=0.0, precision="fp32",
                      eval_every=0, log_every=5, progress=False, resume=resume, checkpoint_every=10)
    return main(SFTConfig(model=str(base), data=(str(data),), out=str(out), lora=lora, batch_size=8,
                          val_fraction=0.125, seed=0, loop=loop, **kw))


def test_full_fine_tune_lowers_held_out_assistant_loss(base, gsm8k, tmp_path, capsys):
    out = tmp_path / "full"
    s = sft(base, gsm8k, out, max_seq_len=256)
    assert s["val_loss"] < s["val_loss_before"] - 1.0, s
    assert s["trainable_parameters"] == s["parameters"] and s["lora_layers"] == 0
    # long questions are cut at 256 tokens, and that is reported, not silent
    data = s["data"]
    assert data["train"]["conversations"] == 56 and data["val"]["conversations"] == 8
    assert data["train"]["truncated"] > 0
    assert f"{data['train']['truncated']} truncated to 256 tokens" in capsys.readouterr().out
    model, tok = load_model(out)  # a complete model dir
    assert tok.special_ids == byte_tokenizer().special_ids
    with pytest.raises(ValueError, match="already holds a `yunque sft` run finished at step 30"):
        sft(base, gsm8k, out)


def test_lora_trains_adapters_only_merges_and_resumes(base, gsm8k, tmp_path):
    base_state = safetensors.torch.load_file(str(base / WEIGHTS))
    out = tmp_path / "lora"
    lora = LoraConfig(rank=4, alpha=8)
    s = sft(base, gsm8k, out, lora=lora, lr=1e-2, steps=20)
    assert s["val_loss"] < s["val_loss_before"] - 0.4, s
    assert s["lora_layers"] == 8 and s["trainable_parameters"] < s["parameters"] / 2
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", TRAINABLE, "train_state.pt"} <= files
    assert WEIGHTS not in files and "config.json" not in files  # no copy of the base
    assert json.loads((out / "adapter_config.json").read_text())["base_model"] == str(base.resolve())
    # the checkpoint holds adapter tensors only
    assert all(".lora_" in k for k in safetensors.torch.load_file(str(out / TRAINABLE)))
    after = safetensors.torch.load_file(str(base / WEIGHTS))
    assert all(torch.equal(after[k], v) for k, v in base_state.items())

    merged_dir = tmp_path / "merged"
    merge(base, out, merged_dir)
    merged, _ = load_model(merged_dir)
    adapted, _ = load_model(base)
    state, cfg = load_adapter(out)
    assert cfg == lora
    attach_lora(adapted, cfg)
    load_lora(adapted, state)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already exists.*--force"):
        merge(base, out, merged_dir)

    # resume with a longer budget: the run's own settings (LoRA included) come from run.json
    s2 = main(SFTConfig(model=str(base), data=(str(gsm8k),), out=str(out),
                        loop=LoopConfig(out_dir=str(out), max_steps=25, resume=True, progress=False)))
    assert s2["steps"] == 25 and s2["lora_layers"] == 8 and s2["val_loss_before"] is None
    assert load_adapter(out)[0].keys() == state.keys()


def test_bad_settings_leave_no_directory(base, gsm8k, tmp_path):
    with pytest.raises(ValueError, match="longer than the model's context"):
        sft(base, gsm8k, tmp_path / "a", max_seq_len=SEQ + 1)
    with pytest.raises(ValueError, match="truncation must be one of 'truncate', 'drop'"):
        sft(base, gsm8k, tmp_path / "b", truncation="cut")
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) q_proj; accepted: down, lm_head, proj, qkv, up"):
        sft(base, gsm8k, tmp_path / "c", lora=LoraConfig(targets=("q_proj",)))
    assert not any((tmp_path / d).exists() for d in "abc")


def test_auto_compile_engages_on_ragged_conversations_and_the_run_finishes(base, tmp_path, monkeypatch):
    """SFT batches are padded to a few length buckets, so the compiled step (here switched on at step 10, as
    compile="auto" does once the time left repays it) meets a handful of static shapes instead of a new length
    at every step: the run that used to crash after ~240 steps with a stride assertion now finishes compiled."""
    from yunque.data.chat_data import ChatBatches, length_bucket, load_conversations
    from yunque.tokenizer.chat import ChatFormat
    from yunque.train import loop as loop_module

    rng = np.random.default_rng(0)
    data = tmp_path / "ragged.jsonl"
    rows = [{"messages": [{"role": "user", "content": "say " + "ab" * int(n)}, {"role": "assistant", "content": "ok"}]}
            for n in np.where(rng.random(64) < 0.8, rng.integers(1, 8, size=64), rng.integers(15, 28, size=64))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setattr(loop_module, "compile_pays", lambda seconds_left: True)
    loop = LoopConfig(max_steps=20, lr=3e-3, warmup_steps=3, weight_decay=0.0, precision="fp32", eval_every=0,
                      progress=False, compile="auto")
    s = main(SFTConfig(model=str(base), data=(str(data),), out=str(tmp_path / "out"), batch_size=4, max_seq_len=64,
                       val_fraction=0.0, loop=loop))
    assert s["steps"] == 20 and s["compiled"]
    train = ChatBatches(ChatFormat.for_tokenizer(byte_tokenizer()), load_conversations([data]), max_seq_len=64)
    lengths = {train.sample(4, seed=0, step=i)[0].shape[1] for i in range(10, 20)}  # the compiled steps' batches
    assert lengths == {length_bucket(33, 64), length_bucket(32, 64)} == {32, 64}  # ragged, two static shapes


def test_run_json_keeps_absolute_paths_so_resume_works_from_anywhere(base, gsm8k, tmp_path, monkeypatch):
    import shutil

    shutil.copy(gsm8k, tmp_path / "chats.jsonl")
    monkeypatch.chdir(tmp_path)
    sft(base, "chats.jsonl", "out", steps=2)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["stage"] == "sft" and run["config"]["data"] == [str(tmp_path / "chats.jsonl")]
    assert run["config"]["model"] == str(base.resolve())
    monkeypatch.chdir(base)
    resumed = main(SFTConfig(model="", data=(), out=str(tmp_path / "out"),
                             loop=LoopConfig(max_steps=3, resume=True, progress=False)))
    assert resumed["steps"] == 3
