"""Hugging Face model dirs in yunque without `transformers`: damaged, incomplete or hostile directories give one
clear ValueError. (Parity with transformers itself: test_hf_transformers.py.)"""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from yunque.config import preset
from yunque.interop.hf import export_hf, import_hf, is_hf_dir, load_hf
from yunque.model.gpt import GPT
from yunque.modeldir import describe, load_model, save_model
from yunque.tokenizer.bpe import byte_tokenizer

TOK = byte_tokenizer()


# ---- damaged directories ----

@pytest.fixture
def hf_dir(tmp_path):
    """A Llama dir (2 layers, d_model 64, 4 heads, 2 kv heads, d_ff 128, untied), written by export_hf."""
    torch.manual_seed(0)
    save_model(tmp_path / "yunque", GPT(preset("tiny", vocab_size=TOK.vocab_size, n_kv_head=2, d_ff=128,
                                               tie_embeddings=False)), TOK)
    export_hf(tmp_path / "yunque", tmp_path / "hf")
    return tmp_path / "hf"


def shard(hf_dir, out, n: int = 3) -> list:
    """Write hf_dir's weights into `out` as n shards and an index, as save_pretrained(max_shard_size=...) does."""
    shutil.copytree(hf_dir, out)
    (out / "model.safetensors").unlink()
    tensors = load_file(hf_dir / "model.safetensors")
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {name: files[k * n // len(names)] for k, name in enumerate(names)}
    for f in files:
        save_file({k: tensors[k] for k, v in weight_map.items() if v == f}, out / f, metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return [out / f for f in files]


def edit_config(hf_dir, **changes):
    path = hf_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_unknown_architecture_lists_the_supported_ones(hf_dir):
    edit_config(hf_dir, model_type="falcon", architectures=["FalconForCausalLM"])
    assert is_hf_dir(hf_dir)
    with pytest.raises(ValueError, match="config.json: model_type 'falcon' is not supported; yunque reads gpt2, "
                                         "llama, mistral, qwen2, qwen3"):
        load_model(hf_dir)


def test_a_config_naming_only_the_architecture(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    del config["model_type"]  # as some old checkpoints write it
    (hf_dir / "config.json").write_text(json.dumps(config))
    assert describe(hf_dir)["format"] == "Hugging Face (llama)"
    load_model(hf_dir)
    (hf_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    for read in (describe, load_model):
        with pytest.raises(ValueError, match="config.json: hidden_size is missing; a llama config needs it"):
            read(hf_dir)


def test_missing_files_are_named(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors: missing"):
        load_hf(hf_dir)
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json: missing"):
        load_hf(hf_dir)
    (hf_dir / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json: missing"):
        load_hf(hf_dir)


def test_missing_shard_is_named(hf_dir, tmp_path):
    shards = shard(hf_dir, tmp_path / "sharded")
    load_hf(tmp_path / "sharded")
    shards[-1].unlink()
    with pytest.raises(ValueError, match=f"{shards[-1].name}: missing; model.safetensors.index.json lists it"):
        load_hf(tmp_path / "sharded")


@pytest.mark.parametrize("outside", ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_naming_a_file_outside_the_dir_is_refused(hf_dir, tmp_path, outside):
    shard(hf_dir, tmp_path / "sharded")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = outside
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    for read in (load_model, describe):
        with pytest.raises(ValueError, match=f"index.json: weight_map names the shard '{outside}', which is not a "
                                             f"file of .*; yunque reads shards only from the model directory"):
            read(tmp_path / "sharded")


@pytest.mark.parametrize("config, message", [
    ([1, 2], "config.json: holds a JSON list, not an object"),  # not an HF dir: read as a yunque one
    ({"architectures": ["LlamaForCausalLM"]}, "config.json: hidden_size is missing; a llama config needs it"),
    ({"model_type": "llama", "vocab_size": 2**34, "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4}, "vocab_size=17179869184 is larger than yunque allows"),
])
def test_untrusted_config_json_is_one_line(hf_dir, config, message):
    (hf_dir / "config.json").write_text(json.dumps(config))
    for read in (load_model, describe):
        with pytest.raises(ValueError, match=message) as e:
            read(hf_dir)
        assert "\n" not in str(e.value)


def test_mismatched_shapes_name_the_tensor_and_both_shapes(hf_dir):
    edit_config(hf_dir, intermediate_size=96)
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \(128, 64\) "
                                         r"but config.json implies \(96, 64\)"):
        load_hf(hf_dir)


def test_shapes_are_checked_against_the_headers_before_anything_is_allocated(hf_dir, monkeypatch):
    edit_config(hf_dir, intermediate_size=1 << 18, hidden_size=1 << 14, num_attention_heads=64,
                num_key_value_heads=8)  # 26 GiB of parameters if allocated
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated before the check"))
    with pytest.raises(ValueError, match=r"tensor model.embed_tokens.weight has shape \(263, 64\) but config.json "
                                         r"implies \(263, 16384\)"):
        load_hf(hf_dir)


def test_weights_of_another_model_are_refused(hf_dir):
    edit_config(hf_dir, num_hidden_layers=3)
    with pytest.raises(ValueError, match="weights do not match config.json.*missing.*model.layers.2"):
        load_hf(hf_dir)


def test_truncated_safetensors(hf_dir):
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_model(hf_dir)



def rewrite_header(path, edit) -> None:
    """Rewrite a safetensors file with `edit(header)` applied to its JSON header (the data is kept as it is)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def first_weight(header) -> dict:
    return header["model.embed_tokens.weight"]


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:5]), "5 bytes, too short for a safetensors header"),
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "header of .* bytes runs past the end of the file"),
    (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]" + b"\0" * 64), "header is not a JSON object"),
    (lambda p: rewrite_header(p, lambda h: first_weight(h).update(
        data_offsets=[o + 10**9 for o in first_weight(h)["data_offsets"]])),
     "tensor model.embed_tokens.weight ends at byte .* but the file has"),
    (lambda p: rewrite_header(p, lambda h: first_weight(h).update(shape=[7, 64])),
     "tensor model.embed_tokens.weight holds .* bytes but F32 \\(7, 64\\) needs 1792"),
    (lambda p: rewrite_header(p, lambda h: first_weight(h).update(data_offsets="nowhere")),
     "tensor model.embed_tokens.weight has a malformed header entry"),
])
def test_damaged_safetensors_headers_are_corrupt_or_truncated(hf_dir, damage, message):
    damage(hf_dir / "model.safetensors")
    with pytest.raises(ValueError, match=f"model.safetensors: {message}.*; the file is corrupt or truncated"):
        load_hf(hf_dir)


def test_unknown_safetensors_dtype_is_named(hf_dir):
    rewrite_header(hf_dir / "model.safetensors", lambda h: first_weight(h).update(dtype="F4"))
    with pytest.raises(ValueError, match="tensor model.embed_tokens.weight has dtype 'F4'; yunque reads F64, F32"):
        load_hf(hf_dir)


# ---- outputs of import and export ----

def test_import_and_export_refuse_an_existing_output_unless_forced(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for convert, source in ((import_hf, hf_dir), (export_hf, tmp_path / "yunque")):
        with pytest.raises(ValueError, match=f"^{out} already exists \\(a non-empty directory\\); pass --force"):
            convert(source, out)
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    import_hf(hf_dir, out, force=True)
    assert load_model(out)[0].cfg.d_ff == 128 and not (out / "notes.txt").exists()
    export_hf(tmp_path / "yunque", out, force=True)
    assert is_hf_dir(out)
    with pytest.raises(ValueError, match="holds the input"):
        export_hf(out, out, force=True)


def test_a_failed_export_leaves_no_partial_output(hf_dir, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("yunque.interop.hf.save_file", disk_full)
    for out in (tmp_path / "new", hf_dir):  # a new output, and an old one being replaced
        before = sorted(p.name for p in tmp_path.iterdir())
        old = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
        with pytest.raises(OSError, match="No space left"):
            export_hf(tmp_path / "yunque", out, force=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial output, no staging dir
        assert old is None or {p.name: p.read_bytes() for p in out.iterdir()} == old
