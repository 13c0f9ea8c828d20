"""Hugging Face interop against `transformers` itself (skipped without it; test_hf.py runs without it).

For each family (GPT-2, Llama with GQA and with Llama 3 rope scaling, Mistral, Qwen2, Qwen3) a tiny random HF
checkpoint loads in yunque with the same logits on a left-padded batch and the same greedy tokens; yunque -> HF ->
yunque is bit-identical; tokenizers give transformers' ids; loading holds one copy of the weights.
"""

import ctypes
import gc
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # set before transformers is imported: these tests never download

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2TokenizerFast,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from yunque.config import preset
from yunque.engine.engine import Engine, SamplingParams
from yunque.interop.hf import export_hf, import_hf, is_hf_dir, load_hf
from yunque.model.gpt import GPT
from yunque.model.kv_cache import KVCache
from yunque.modeldir import load_model, save_model, weights_of
from yunque.tokenizer.bpe import Tokenizer, byte_tokenizer, gpt2_tokenizer_from_files, train_bpe
from yunque.tokenizer.chat import render, render_prompt

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
SPANISH = ("¿Dónde está la biblioteca? El señor Núñez leyó «Cien años de soledad» junto a la chimenea, "
           "mientras su hija tocaba el acordeón. ¡Qué pingüino tan pequeño! Mañana habrá más niños en el año 2024.")
LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "max_position_embeddings": 128, "rms_norm_eps": 1e-5}
FAMILIES = {
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "llama-gqa-linear-rope": lambda: LlamaConfig(**LLAMA, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # theta 1e4 with an original context of 32 puts rotary frequencies in all three llama3 bands
    "llama-llama3-rope": lambda: LlamaConfig(
        **{**LLAMA, "num_key_value_heads": 1}, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    "mistral": lambda: MistralConfig(**LLAMA, head_dim=16, sliding_window=4096),
    "qwen2": lambda: Qwen2Config(**LLAMA, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**LLAMA, head_dim=32),  # head_dim != hidden_size / heads; saved in shards
}
MAX_DIFF = {}


@pytest.fixture(scope="module")
def texts(shared_data):
    shakespeare = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]
    with open(shared_data / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        gsm8k = [json.loads(line)["question"] for _, line in zip(range(50), f)]
    return {"shakespeare": shakespeare, "gsm8k": "\n".join(gsm8k), "spanish": SPANISH}


@pytest.fixture(scope="module")
def tok(texts):
    return train_bpe([texts["shakespeare"]], 400)


def randomize(model: torch.nn.Module) -> None:
    """Large random weights (norm gains around 1), so that logits are far apart and every tensor matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)


def write_hf_tokenizer(tok: Tokenizer, out, *, gpt2_files: bool) -> None:
    if gpt2_files:  # what old GPT-2 dirs hold instead of tokenizer.json
        tok.inner.model.save(str(out))
    else:
        tok.save(out)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|endoftext|>",
              "pad_token": "<|pad|>", "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tok):
    """(name, HF dir, the HF model in memory) for one family: a tiny random checkpoint saved by transformers."""
    name = request.param
    cfg = FAMILIES[name]()
    cfg.vocab_size = tok.vocab_size
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    randomize(model)
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out, **({"max_shard_size": "60KB"} if name == "qwen3" else {}))
    write_hf_tokenizer(tok, out, gpt2_files=name == "gpt2")
    return name, out, model


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def prompts_of(tok: Tokenizer, texts) -> list[list[int]]:
    s = texts["shakespeare"]
    return [tok.encode(s[:60]), tok.encode(s[1000:1030]), tok.encode(s[5000:5100])]


def test_logits_match_transformers_on_a_left_padded_batch(family, tok, texts):
    name, hf_dir, hf = family
    model, ytok = load_model(hf_dir)  # an HF dir goes through load_model too
    assert ytok.fingerprint() == tok.fingerprint() or name == "gpt2"
    prompts = prompts_of(tok, texts)
    ids, mask = left_padded(prompts, tok.pad_id)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        ours = model(ids, kv_cache=KVCache(model.cfg, len(prompts), ids.shape[1], pad=(1 - mask).sum(1)))
    real = mask.bool()
    diff = (ours[real] - theirs[real]).abs().max().item()
    MAX_DIFF[name] = diff
    print(f"\n{name}: max |logit difference| = {diff:.2e} (logit scale {theirs[real].abs().max().item():.1f})")
    assert diff < 1e-4


def test_greedy_generation_matches_transformers(family, tok, texts):
    _, hf_dir, hf = family
    model, ytok = load_hf(hf_dir)
    engine = Engine(model, ytok, precision="fp32")  # parity with transformers in fp32
    prompts = prompts_of(tok, texts)
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=32, temperature=0))
    ids, mask = left_padded(prompts, tok.pad_id)
    stop = sorted(engine.stop_ids)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=stop,
                          pad_token_id=tok.pad_id)
    for row, got in zip(out[:, ids.shape[1]:].tolist(), ours):
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))  # we return ids without the stop token
        assert got == row[:cut]
    assert sum(map(len, ours)) > 32  # the comparison was not vacuous


def saved_tensors(hf_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in hf_dir.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


def test_round_trips_are_bit_identical(family, tmp_path):
    _, hf_dir, _ = family
    import_hf(hf_dir, tmp_path / "yunque")
    assert not is_hf_dir(tmp_path / "yunque") and is_hf_dir(hf_dir)
    model, _ = load_model(tmp_path / "yunque")
    export_hf(tmp_path / "yunque", tmp_path / "hf")
    again, _ = load_model(tmp_path / "hf")
    a, b = weights_of(model), weights_of(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # yunque -> HF -> yunque
    original, exported = saved_tensors(hf_dir), saved_tensors(tmp_path / "hf")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)  # HF -> yunque -> HF
    # special tokens, chat template and generation defaults survive both steps
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.chat_template == CHAT_TEMPLATE
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|bos|>", "<|endoftext|>", "<|pad|>")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"]


def test_bf16_checkpoints_stay_bf16_unless_a_dtype_is_asked(tmp_path, tok):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA, vocab_size=tok.vocab_size)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    write_hf_tokenizer(tok, tmp_path / "hf", gpt2_files=False)
    model, _ = load_hf(tmp_path / "hf")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    wide, _ = load_hf(tmp_path / "hf", dtype=torch.float32)
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    assert all(torch.equal(a.float(), b) for a, b in zip(model.parameters(), wide.parameters()))
    import_hf(tmp_path / "hf", tmp_path / "yunque")
    with safe_open(str(tmp_path / "yunque" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (not a dict)



def test_hub_style_gpt2_checkpoint_without_prefix_and_with_mask_buffers(tmp_path, tok):
    """The Hub's gpt2 stores "h.0.attn.c_attn.weight" (no "transformer.") and the causal-mask buffers."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                     vocab_size=tok.vocab_size)).eval()
    hf.save_pretrained(tmp_path)
    write_hf_tokenizer(tok, tmp_path, gpt2_files=True)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    tensors.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64).tril() for i in range(2)})
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_hf(tmp_path)
    ids = torch.tensor([tok.encode("To be, or not to be")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-5)

# ---- exporting models trained by yunque ----

EXPORTS = {
    "llama": ("tiny", {}),
    "llama-gqa-untied-llama3-rope": ("tiny", {"n_kv_head": 2, "tie_embeddings": False, "rope_scaling": {
        "rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 32}}),
    "qwen2": ("tiny", {"qkv_bias": True}),
    "qwen3": ("tiny", {"qk_norm": True, "head_dim": 32, "n_kv_head": 2}),
    "gpt2": ("gpt2-tiny", {}),
    "gpt2-untied": ("gpt2-tiny", {"tie_embeddings": False}),
}


def trained(name: str, overrides: dict, tok: Tokenizer, text: str) -> GPT:
    """A tiny model after a few optimizer steps on real text (so no weight is still at its initial value)."""
    torch.manual_seed(0)
    model = GPT(preset(name, vocab_size=tok.vocab_size, max_seq_len=128, **overrides))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor(tok.encode(text)[: 4 * 33]).view(4, 33)
    for _ in range(3):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_exported_model_loads_in_transformers_with_identical_outputs(kind, tmp_path, tok, texts):
    model = trained(*EXPORTS[kind], tok, texts["shakespeare"])
    save_model(tmp_path / "yunque", model, tok)
    export_hf(tmp_path / "yunque", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.config.model_type == kind.split("-")[0]
    text = texts["shakespeare"][:150]
    assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True)  # the start token yunque adds, added
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    print(f"\nexported {kind}: max |logit difference| = {diff:.2e}")
    assert diff < 1e-5
    again, _ = load_hf(tmp_path / "hf")
    a, b = weights_of(model), weights_of(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert hf_tok.decode(ids[0]) == tok.decode(ids[0].tolist())


def test_exported_chat_model_replies_in_transformers_as_in_yunque(tmp_path, tok):
    """A chat model, exported: transformers renders the prompt with the exported chat template (the ids of
    render_prompt), and greedy generate() gives yunque's reply token for token, stopping at <|end|>."""
    conversation = [{"role": "system", "content": "Answer in one line."},
                    {"role": "user", "content": "Who is the king?"},
                    {"role": "assistant", "content": "King Richard, my lord, and long may he reign."}]
    ids, mask = render(tok, conversation)
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([[i if learn else -100 for i, learn in zip(ids[1:], mask[1:])]])
    for _ in range(80):  # SFT on one conversation: the reply, and its end of turn, are learnt
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(tmp_path / "yunque", model.eval(), tok)
    export_hf(tmp_path / "yunque", tmp_path / "hf")

    messages, end = conversation[:2], tok.special_ids["<|end|>"]
    prompt = render_prompt(tok, messages)
    loaded, ytok = load_model(tmp_path / "yunque")
    ours = Engine(loaded, ytok, precision="fp32").generate([prompt], SamplingParams(max_new_tokens=40,
                                                                                    temperature=0))[0]
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    theirs_prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert theirs_prompt == prompt
    with torch.no_grad():
        out = hf.generate(torch.tensor([theirs_prompt]), max_new_tokens=40, do_sample=False)
    reply = out[0, len(prompt):].tolist()
    assert reply == [*ours, end]  # generate() stopped at the end of the turn, as the engine did
    assert len(ours) > 10 and ytok.decode(ours) == conversation[2]["content"]
    assert hf_tok.eos_token == "<|end|>"


# ---- tokenizers ----

@pytest.mark.parametrize("which", ["bpe", "bytes", "gpt2"])
def test_yunque_tokenizer_json_gives_the_same_ids_in_transformers(which, tok, texts, tmp_path, shared_data):
    ours = {"bpe": tok, "bytes": byte_tokenizer(),
            "gpt2": gpt2_tokenizer_from_files(shared_data / "gpt2-bpe" / "gpt2_vocab.json",
                                              shared_data / "gpt2-bpe" / "gpt2_merges.txt")}[which]
    write_hf_tokenizer(ours, tmp_path, gpt2_files=False)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    for name, text in texts.items():
        assert theirs(text)["input_ids"] == ours.encode(text), name


def test_gpt2_bpe_files_reproduce_gpt2_ids(shared_data, texts):
    vocab, merges = shared_data / "gpt2-bpe" / "gpt2_vocab.json", shared_data / "gpt2-bpe" / "gpt2_merges.txt"
    ours = gpt2_tokenizer_from_files(vocab, merges)
    theirs = GPT2TokenizerFast(vocab=str(vocab), merges=str(merges))
    for name, text in texts.items():
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), name
        assert len(ids) < len(text.encode()) / 2  # real merges happened
    assert ours.eos_id == theirs.eos_token_id == 50256


# ---- memory ----

def high_water() -> int:
    """Peak resident memory of this process, in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM and clear_refs")
@pytest.mark.parametrize("dtype, shard", [(torch.float32, None), (torch.bfloat16, "8MB")])
def test_loading_holds_one_copy_of_the_weights(tmp_path, tok, dtype, shard):
    """Peak resident memory grows by about the checkpoint's size, not twice it: weights are read into the model,
    never mapped (pages of a mapped file count as resident once touched)."""
    cfg = LlamaConfig(**{**LLAMA, "hidden_size": 256}, vocab_size=16384)  # 8.4M parameters, mostly embeddings
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(dtype).save_pretrained(
        tmp_path, **({"max_shard_size": shard} if shard else {}))
    write_hf_tokenizer(tok, tmp_path, gpt2_files=False)
    size = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    gc.collect()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):  # glibc: hand freed heap back, so that memory the load reuses counts too
        libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak at the current resident size
    base = high_water()
    model, _ = load_hf(tmp_path)
    growth = high_water() - base
    assert not shard or len(list(tmp_path.glob("*.safetensors"))) > 1
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert growth < 1.25 * size, f"peak grew by {growth / size:.2f}x the checkpoint's size"
