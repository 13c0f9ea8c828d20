"""Model directories: save/load gives identical logits; damaged directories give one clear ValueError."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from yunque.config import LoraConfig, preset
from yunque.model.gpt import GPT, meta_model
from yunque.model.lora import attach_lora, lora_state_dict, save_adapter
from yunque.modeldir import MAX_HEADER, describe, load_model, read_safetensors_header, save_model
from yunque.tokenizer.bpe import byte_tokenizer

TOK = byte_tokenizer()


def tiny(name: str = "tiny", **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(preset(name, vocab_size=TOK.vocab_size, max_seq_len=32, **overrides)).eval()


@pytest.fixture
def model_dir(tmp_path):
    out = tmp_path / "model"
    save_model(out, tiny(), TOK)
    return out


@pytest.mark.parametrize("name, overrides", [
    ("tiny", {}),
    ("tiny", {"tie_embeddings": False, "n_kv_head": 2, "qk_norm": True}),
    ("gpt2-tiny", {}),
])
def test_round_trip_gives_identical_logits(tmp_path, name, overrides):
    model = tiny(name, **overrides)
    with torch.no_grad():  # untied: make the head differ from the embedding so a mix-up would show
        model.lm_head.weight.add_(0.0 if model.cfg.tie_embeddings else 0.01)
    save_model(tmp_path, model, TOK)
    loaded, tok = load_model(tmp_path)
    ids = torch.randint(0, TOK.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert not loaded.training
    assert tok.fingerprint() == TOK.fingerprint()
    stored = load_file(tmp_path / "model.safetensors")
    if model.cfg.tie_embeddings:
        assert "lm_head.weight" not in stored  # stored once
        assert loaded.lm_head.weight is loaded.tok_emb.weight  # and still tied, so training keeps them equal
    else:
        assert not torch.equal(loaded.lm_head.weight, loaded.tok_emb.weight)


def test_truncated_weights(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for load in (load_model, describe):
        with pytest.raises(ValueError, match="corrupt or truncated"):
            load(model_dir)


def test_missing_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    for load in (load_model, describe):
        with pytest.raises(ValueError, match="model.safetensors: missing"):
            load(model_dir)


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json: missing"):
        load_model(model_dir)


def test_corrupt_config_json(model_dir):
    (model_dir / "config.json").write_text('{"n_layer": 2,', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON.*corrupt"):
        load_model(model_dir)


def test_config_json_that_is_not_an_object(model_dir):
    (model_dir / "config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="config.json: holds a JSON list, not an object; the model directory is"):
        load_model(model_dir)


def edit_config(model_dir, **changes) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}), encoding="utf-8")


def test_config_that_does_not_match_the_weights(model_dir):
    edit_config(model_dir, d_model=128)
    with pytest.raises(ValueError, match=r"tensor \S+ has shape \(64, 64\) but config.json implies \(128, 128\)"):
        load_model(model_dir)


def test_shapes_are_checked_against_the_header_before_the_weights_are_read(model_dir, monkeypatch):
    edit_config(model_dir, d_model=4096, vocab_size=1 << 20)  # a config that would allocate 16 GiB
    monkeypatch.setattr("yunque.modeldir.load_file", lambda *a: pytest.fail("weights read before the check"))
    with pytest.raises(ValueError, match=r"tensor \S+ has shape \(64, 64\) but config.json implies \(4096, 4096\)"):
        load_model(model_dir)


def test_config_with_other_layers_than_the_weights(model_dir):
    edit_config(model_dir, n_layer=3)
    with pytest.raises(ValueError, match=r"weights do not match config.json \(missing \['blocks.2"):
        load_model(model_dir)


def test_config_with_an_unknown_key(model_dir):
    edit_config(model_dir, n_embd=64)
    with pytest.raises(ValueError, match=r"config.json: unknown model config keys \['n_embd'\]"):
        load_model(model_dir)


@pytest.mark.parametrize("changes, message", [
    ({"n_head": 0}, "n_head must be positive, got 0"),
    ({"n_head": None}, "n_head must be an integer, got None"),
    ({"d_model": "64"}, "d_model must be an integer, got '64'"),
    ({"vocab_size": 2**34}, "vocab_size=17179869184 is larger than yunque allows"),
])
def test_untrusted_sizes_fail_before_anything_is_allocated(model_dir, changes, message):
    edit_config(model_dir, **changes)
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        load_model(model_dir)


def test_config_with_an_invalid_value(model_dir):
    edit_config(model_dir, n_head=5)
    with pytest.raises(ValueError, match="config.json: d_model=64 is not divisible by n_head=5"):
        load_model(model_dir)


def test_not_a_directory_and_missing_tokenizer(tmp_path, model_dir):
    with pytest.raises(ValueError, match="not a model directory"):
        load_model(tmp_path / "nowhere")
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_model(model_dir)


def test_describe(tmp_path):
    save_model(tmp_path, tiny(n_kv_head=2), TOK)
    d = describe(tmp_path)
    assert set(d) == {"model", "format", "architecture", "parameters", "flops_per_token", "context", "tokenizer",
                      "weights"}
    assert d["format"] == "yunque"
    cfg = preset("tiny", vocab_size=TOK.vocab_size, max_seq_len=32, n_kv_head=2)
    assert d["architecture"] == ("llama-style decoder: 2 layers, d_model 64, 4 heads (2 kv heads), rope positions, "
                                 "rmsnorm, swiglu")
    assert d["parameters"].startswith(f"{cfg.num_params():,} (")
    assert d["flops_per_token"].startswith(f"{cfg.flops_per_token():,} ")
    assert d["context"] == 32
    assert d["tokenizer"] == "bytes, 263 tokens"
    assert d["weights"].endswith(" MiB")

    lines = [{"step": 10, "loss": 3.0, "val_loss": 3.2, "elapsed": 30.0}, {"step": 20, "loss": 2.5, "elapsed": 90.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert describe(tmp_path)["training"] == {"steps": 20, "final_loss": 2.5, "val_loss": 3.2, "minutes": 1.5}


def test_describe_tolerates_a_cut_last_line_of_metrics(model_dir):
    lines = [{"step": 10, "loss": 3.0, "val_loss": 3.2, "elapsed": 30.0}, {"step": 20, "loss": 2.5, "elapsed": 90.0}]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (model_dir / "metrics.jsonl").write_text(text + '{"step": 30, "lo', encoding="utf-8")  # killed mid-append
    assert describe(model_dir)["training"] == {"steps": 20, "final_loss": 2.5, "val_loss": 3.2, "minutes": 1.5}


def test_describe_a_lora_adapter_dir(tmp_path):
    model = tiny()
    cfg = LoraConfig(rank=4, alpha=8.0, targets=("qkv", "down"))
    attach_lora(model, cfg)
    save_adapter(tmp_path / "adapter", model, cfg, base_model="/runs/base")
    d = describe(tmp_path / "adapter")
    n = sum(t.numel() for t in lora_state_dict(model).values())
    assert {k: d[k] for k in ("format", "adapter", "base_model", "parameters")} == {
        "format": "LoRA adapter", "adapter": "rank 4, alpha 8, targets qkv, down", "base_model": "/runs/base",
        "parameters": f"{n:,} (adapter only)"}
    with pytest.raises(ValueError, match=r"adapter is a LoRA adapter, not a model; apply it to its base model "
                                         r"\(`yunque chat BASE --adapter .*`\) or fold it in"):
        load_model(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors: missing"):
        describe(tmp_path / "adapter")


def test_loading_builds_no_random_weights_and_leaves_the_layers_as_they_were(model_dir):
    # The start-up fast path: the frame for loaded weights is built without filling it, which would import
    # torch._dynamo (~0.9 s). Checked in a fresh process, where nothing else has imported it yet.
    code = (f"import sys; from yunque.modeldir import load_model; load_model({str(model_dir)!r}); "
            f"print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 8).weight.detach().clone()
    meta_model(preset("tiny", vocab_size=300))
    torch.manual_seed(0)
    assert torch.equal(torch.nn.Linear(8, 8).weight, a)  # constructors fill their weights again afterwards


def test_safetensors_header_reader(model_dir, tmp_path):
    tensors, metadata = read_safetensors_header(model_dir / "model.safetensors")
    assert tensors["tok_emb.weight"].shape == (263, 64) and tensors["tok_emb.weight"].dtype == "F32"
    assert tensors["tok_emb.weight"].torch_dtype == torch.float32 and metadata == {}
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((MAX_HEADER + 1).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match=f"header of {MAX_HEADER + 1} bytes is larger than safetensors allows"):
        read_safetensors_header(huge)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((20).to_bytes(8, "little") + b'{"__metadata__": 1}' + b" ")
    with pytest.raises(ValueError, match="__metadata__ is not a JSON object of strings; the file is corrupt"):
        read_safetensors_header(bad)
    with pytest.raises(ValueError, match="nowhere.safetensors: cannot read weights"):
        read_safetensors_header(tmp_path / "nowhere.safetensors")
