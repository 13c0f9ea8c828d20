"""GGUF in: files written with the gguf library's own writer (every quantization type), yunque's GGUF export read
back, the real SmolLM2-135M-Instruct Q4_1 file against transformers' GGUF reader, and bad input as one line."""

import dataclasses
import io
import json
import sys

import numpy as np
import pytest
import tokenizers
import torch

gguf = pytest.importorskip("gguf")

from tests.cli.util import fails
from tests.interop.test_gguf import MODELS, expected_tensors
from yunque.cli import main
from yunque.config import SamplingParams, preset
from yunque.engine.engine import Engine
from yunque.interop.gguf import export_gguf
from yunque.interop.gguf_reader import GGUF, import_gguf, load_gguf
from yunque.model.gpt import GPT
from yunque.modeldir import generation_stop_ids, load_model, save_model
from yunque.tokenizer.bpe import Tokenizer, train_bpe
from yunque.tokenizer.chat import ChatFormat

Q = gguf.GGMLQuantizationType
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
SPANISH = ("¿Dónde está la estación de tren? ¡Necesito llegar a Málaga antes de las 10:30!",
           "El niño comió una piña y un ñandú corrió por el campo de Peñíscola. 🍍🐦",
           "Señora Muñoz, ¿podría decirme cuánto cuesta el café con leche? ¡Qué barato! ☕😊",
           "Aunque llovió mucho, el pingüino bailó flamenco en la azotea del edificio número 1234.")


@pytest.fixture(scope="module")
def tok(shared_data):
    return train_bpe([(shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]], 400)


@pytest.fixture(scope="module")
def transformers():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    transformers.logging.set_verbosity_error()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield transformers


def logits(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


# ---- GGUFs written by the gguf library, the way llama.cpp's converter lays them out ----

def random_k_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random K-quant blocks whose weights stay below ~0.1 (their super-block scales set so): the gguf library
    dequantizes K-quants but cannot make them."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    largest = {Q.Q4_K: 63 * 15, Q.Q5_K: 63 * 31, Q.Q6_K: 128 * 32}[qtype]  # sub-block scale x quant, at most
    scales = rng.uniform(0.1 / largest / 4, 0.1 / largest, (rows, cols // block, 2))
    scales = scales.astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        raw[..., -2:] = scales[..., :2]  # d, the block's last field
    else:
        raw[..., :4] = scales  # d and dmin, its first
    return raw.reshape(rows, -1)


def write_gguf(path, model: GPT, tok: Tokenizer, arch: str, qtype, *, pre: str = "gpt-2", vocab=None) -> None:
    """`model` as llama.cpp lays it out (names and q/k order restated by hand in test_gguf.expected_tensors),
    matrices stored as `qtype`, with `tok` as a byte-level BPE vocabulary (or what `vocab(writer)` writes)."""
    cfg, rng = model.cfg, np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ff_dim)
    w.add_head_count(cfg.n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_head_count_kv(cfg.kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.dim_head)
        w.add_key_length(cfg.dim_head)
    if vocab is not None:
        vocab(w)
    else:
        ids = tok.inner.get_vocab(with_added_tokens=True)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(sorted(ids, key=ids.get))
        w.add_token_types([3 if i in tok.special_ids.values() else 1 for i in range(len(ids))])
        w.add_token_merges([" ".join(m) for m in json.loads(tok.inner.to_str())["model"]["merges"]])
        w.add_eos_token_id(tok.eos_id)
        w.add_add_bos_token(False)
    for name, t in expected_tensors(model, arch).items():
        a = t.detach().float().numpy()
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, a)
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        elif qtype in K_QUANTS:
            w.add_tensor(name, random_k_blocks(*a.shape, qtype, rng), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# K-quants need rows that are multiples of 256 wide; transformers assumes Qwen3's head_dim is 128 and GPT-2's
# context 1024, so the synthetic configs give those
SYNTHETIC = {
    "llama": ("tiny", {"d_model": 256, "d_ff": 512, "n_kv_head": 2, "tie_embeddings": False}),
    "qwen2": ("tiny", {"d_model": 256, "d_ff": 512, "n_kv_head": 2, "qkv_bias": True}),
    "qwen3": ("tiny", {"d_model": 256, "d_ff": 512, "n_head": 2, "n_kv_head": 1, "qk_norm": True}),
    "gpt2": ("gpt2-tiny", {"d_model": 256, "max_seq_len": 1024}),
}
CASES = [("llama", q) for q in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, *K_QUANTS)] + [
    ("qwen2", Q.Q4_K), ("qwen2", Q.Q8_0), ("qwen3", Q.Q5_1), ("qwen3", Q.Q6_K), ("gpt2", Q.Q4_0), ("gpt2", Q.F16)]


@pytest.mark.parametrize("arch, qtype", CASES, ids=[f"{a}-{q.name}" for a, q in CASES])
def test_synthetic_gguf_gives_transformers_logits_and_token_ids(tmp_path, tok, transformers, shared_data, arch,
                                                                 qtype):
    name, overrides = SYNTHETIC[arch]
    torch.manual_seed(0)
    source = GPT(preset(name, vocab_size=tok.vocab_size, **overrides)).eval()
    with torch.no_grad():  # norm gains and biases off 1 and 0, so that a misplaced one shows
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    write_gguf(tmp_path / "m.gguf", source, tok, arch, qtype)

    model, ours = load_model(tmp_path / "m.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert model.cfg.tie_embeddings == source.cfg.tie_embeddings
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:1500]
    ids = ours.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    with torch.no_grad():
        want = hf(torch.tensor([ids[:100]])).logits[0]
    torch.testing.assert_close(logits(model, ids[:100]), want, rtol=0, atol=1e-4)
    if qtype == Q.F32:  # nothing lost on the way: the model that was written
        torch.testing.assert_close(logits(model, ids[:100]), logits(source, ids[:100]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_yunque_export_reads_back_with_the_same_logits_tokens_and_chat_format(tmp_path, tok, kind, shared_data):
    name, overrides = MODELS[kind]
    torch.manual_seed(0)
    source = GPT(preset(name, vocab_size=tok.vocab_size, **overrides)).eval()
    save_model(tmp_path / "src", source, tok)
    export_gguf(tmp_path / "src", tmp_path / "m.gguf", dtype="f32")
    model, back = load_model(tmp_path / "m.gguf")
    # the same architecture (rope_freqs.weight becomes Llama 3 scaling again), with d_ff written out
    assert dataclasses.replace(model.cfg, d_ff=None) == source.cfg and model.cfg.ff_dim == source.cfg.ff_dim
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:3000]
    ids = back.encode(text, bos=True)
    assert ids == tok.encode(text, bos=True)
    assert back.decode(ids) == tok.decode(ids)
    torch.testing.assert_close(logits(model, ids[:120]), logits(source, ids[:120]), rtol=0, atol=1e-5)
    # the chat format and stop ids travel inside the file
    talk = [{"role": "user", "content": "Who art thou?"}, {"role": "assistant", "content": "A friend."}]
    fmt = ChatFormat.of(tmp_path / "m.gguf", back)
    assert fmt.kind == "template" and fmt.render(talk) == ChatFormat.of(tmp_path / "src", tok).render(talk)
    assert tok.special_ids["<|end|>"] in fmt.stop_ids
    assert generation_stop_ids(tmp_path / "m.gguf", model.cfg.vocab_size) == {tok.special_ids["<|end|>"]}


def test_q8_0_export_reads_back_close_to_the_source(tmp_path, tok):
    torch.manual_seed(0)
    source = GPT(preset("tiny", vocab_size=tok.vocab_size, n_kv_head=2)).eval()
    save_model(tmp_path / "src", source, tok)
    export_gguf(tmp_path / "src", tmp_path / "m.gguf", dtype="q8_0")
    model, _ = load_model(tmp_path / "m.gguf")
    ids = list(range(7, 90))
    got, want = logits(model, ids), logits(source, ids)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_import_writes_a_model_dir_with_chat_template_and_stop_ids(tmp_path, tok, capsys):
    torch.manual_seed(0)
    source = GPT(preset("tiny", vocab_size=tok.vocab_size)).eval()
    save_model(tmp_path / "src", source, tok)
    export_gguf(tmp_path / "src", tmp_path / "m.gguf", dtype="f16")
    assert main(["import", str(tmp_path / "m.gguf"), str(tmp_path / "out")]) == 0
    assert "imported" in capsys.readouterr().out
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "generation_config.json"}
    (m1, t1), (m2, t2) = load_model(out), load_model(tmp_path / "m.gguf")
    ids = t1.encode("To be, or not to be", bos=True)
    assert ids == t2.encode("To be, or not to be", bos=True) and ids[0] == tok.bos_id
    torch.testing.assert_close(logits(m1, ids), logits(m2, ids), rtol=0, atol=0)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["eos_token"] == "<|end|>" and config["add_bos_token"] is True
    assert ChatFormat.of(out, t1).kind == "template"
    fails(capsys, ["import", str(tmp_path / "m.gguf"), str(out)], "already exists", "--force")
    assert main(["info", str(tmp_path / "m.gguf")]) == 0
    info = capsys.readouterr().out
    assert "GGUF (llama)" in info and "F16 x" in info
    # exported onwards, the GGUF's chat template and stop ids go with it
    assert main(["export", str(tmp_path / "m.gguf"), "--format", "hf", str(tmp_path / "hf")]) == 0
    hf_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert hf_config["chat_template"] == config["chat_template"] and hf_config["eos_token"] == "<|end|>"
    hf_gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text(encoding="utf-8"))
    assert tok.special_ids["<|end|>"] in hf_gen["eos_token_id"]


def sentencepiece_vocab(text: str):
    """A llama-1/2 style vocabulary as llama.cpp writes it (tokenizer.ggml.model "llama"): <unk>, <s>, </s>, the
    256 byte tokens, then pieces ranked by score, and no merges. The pieces come from a sentencepiece-style BPE
    trained here."""
    sp = tokenizers.SentencePieceBPETokenizer()
    sp.train_from_iterator([text], vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    learned = sorted((i, t) for t, i in sp.get_vocab().items() if t not in ("<unk>", "<s>", "</s>"))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *(t for _, t in learned)]
    types = [2, 3, 3, *[6] * 256, *[1] * len(learned)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(learned))]

    def write(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    return tokens, write


def test_sentencepiece_vocabulary_gives_transformers_token_ids(tmp_path, tok, transformers, shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tokens, vocab = sentencepiece_vocab(text[:30_000])
    torch.manual_seed(0)
    name, overrides = SYNTHETIC["llama"]
    model = GPT(preset(name, vocab_size=len(tokens), **overrides))
    write_gguf(tmp_path / "sp.gguf", model, tok, "llama", Q.Q8_0, vocab=vocab)
    _, ours = load_model(tmp_path / "sp.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    assert ours.bos_id == 1  # llama.cpp starts sentencepiece text with <s> unless the file says otherwise
    for sample in (text[40_000:42_000], *SPANISH, " two  spaces and\nnew lines\n"):
        ids = ours.encode(sample, bos=True)
        assert ids == theirs(sample)["input_ids"], sample[:60]
        assert ours.decode(ids[1:]) == theirs.decode(ids[1:])
        # ñ, ¿ and emoji come back through the byte tokens; a leading space is the one sentencepiece drops
        assert ours.decode(ids[1:]) == sample.removeprefix(" ")


# ---- bad input: one line each ----

def small_gguf(tmp_path, tok, arch: str = "llama", qtype=Q.Q8_0):
    torch.manual_seed(0)
    name, overrides = SYNTHETIC["gpt2" if arch == "gpt2" else "llama"]
    path = tmp_path / f"{arch}-{qtype.name}.gguf"
    write_gguf(path, GPT(preset(name, vocab_size=tok.vocab_size, **overrides)), tok, arch, qtype)
    return path


def test_a_truncated_file_is_one_line(tmp_path, tok, capsys):
    path = small_gguf(tmp_path, tok)
    data = path.read_bytes()
    for cut in (len(data) - 1000, 2000, 100, 10):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a complete GGUF file.*truncated or corrupt"):
            load_model(tmp_path / "cut.gguf")
    fails(capsys, ["chat", str(tmp_path / "cut.gguf")], "cut.gguf", "truncated or corrupt")


def test_an_unknown_architecture_lists_the_supported_ones(tmp_path, tok, capsys):
    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    err = fails(capsys, ["import", str(tmp_path / "falcon.gguf"), str(tmp_path / "out")],
                "architecture 'falcon' is not supported", "llama", "qwen2", "qwen3", "gpt2")
    assert "falcon.gguf" in err and not (tmp_path / "out").exists()


def test_an_unknown_quantization_type_is_named(tmp_path, tok, capsys):
    # Q8_1 is a type the gguf library knows but cannot dequantize
    path = small_gguf(tmp_path, tok, qtype=Q.Q8_0)
    data = bytearray(path.read_bytes())
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    where = int(t.field.offset) + sum(p.nbytes for p in t.field.parts[:-2])  # ... type (u32), offset (u64)
    assert int.from_bytes(data[where:where + 4], "little") == Q.Q8_0
    data[where:where + 4] = int(Q.Q8_1).to_bytes(4, "little")  # Q8_1 blocks of 32 are 36 bytes, not 34: shorter rows
    (tmp_path / "q81.gguf").write_bytes(bytes(data))
    fails(capsys, ["generate", str(tmp_path / "q81.gguf"), "hi"], "blk.0.attn_q.weight", "stored as Q8_1")
    data[where:where + 4] = (99).to_bytes(4, "little")  # a type id no gguf library knows
    (tmp_path / "q99.gguf").write_bytes(bytes(data))
    fails(capsys, ["generate", str(tmp_path / "q99.gguf"), "hi"], "unknown quantization type", "99")


def test_an_unknown_vocabulary_kind_is_one_line(tmp_path, tok, capsys):
    def rwkv(w):
        w.add_tokenizer_model("rwkv")
        w.add_token_list([f"t{i}" for i in range(tok.vocab_size)])

    torch.manual_seed(0)
    name, overrides = SYNTHETIC["llama"]
    write_gguf(tmp_path / "rwkv.gguf", GPT(preset(name, vocab_size=tok.vocab_size, **overrides)), tok, "llama",
               Q.Q8_0, vocab=rwkv)
    fails(capsys, ["chat", str(tmp_path / "rwkv.gguf")], "tokenizer.ggml.model is 'rwkv'", "'gpt2'", "'llama'")


def test_not_a_gguf_file_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.gguf").write_text("these are my notes\n", encoding="utf-8")
    fails(capsys, ["generate", str(tmp_path / "notes.gguf"), "hi"], "notes.gguf: not a GGUF file")
    fails(capsys, ["import", str(tmp_path / "notes.gguf"), str(tmp_path / "out")], "not a GGUF file")
    assert not GGUF.recognise(tmp_path) and GGUF.recognise(tmp_path / "notes.gguf")


# ---- the real model: SmolLM2-135M-Instruct, Q4_1, against transformers on the same file ----

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf, transformers):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    # transformers' GGUF reader has no split for tokenizer.ggml.pre "smollm" and falls back to GPT-2's, which
    # differs from llama.cpp's ("\p{N}" first: llama-vocab.cpp) and from SmolLM2's own tokenizer.json (Digits, then
    # ByteLevel) where whitespace precedes a digit ("people.\n\n1."). Everything else (vocabulary, merges, special
    # tokens, BOS) is transformers' own.
    assert json.loads(tok.backend_tokenizer.pre_tokenizer.__getstate__())["type"] == "ByteLevel"
    tok.backend_tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return model, tok


def shared_texts(shared_data) -> list[str]:
    texts = [(shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:6000],
             (shared_data / "tinystories" / "tinystories_sample.txt").read_text(encoding="utf-8")]
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:15]
    texts += [f"{d['question']}\n{d['answer']}" for d in map(json.loads, lines)]
    lines = (shared_data / "self-instruct" / "seed_tasks.jsonl").read_text(encoding="utf-8").splitlines()[:15]
    texts += [f"{d['instruction']}\n\n{d['instances'][0]['output']}" for d in map(json.loads, lines)]
    texts = [*texts, *SPANISH, "  leading spaces,\ttabs\n\n\nand 3.14159 or 1,000,000 text"]
    # yunque encodes a special token's text in data as plain text (data cannot forge one), transformers as the token
    return [t.replace("<|endoftext|>", "\n") for t in texts]


def test_smollm2_token_ids_equal_transformers(smollm2, smollm2_hf, shared_data):
    (_, ours), (_, theirs) = smollm2, smollm2_hf
    for text in shared_texts(shared_data):
        ids = ours.encode(text, bos=ours.bos_id is not None)
        assert ids == theirs(text)["input_ids"], text[:60]
        assert ours.decode(ids) == text
    assert ours.bos_id is None  # add_bos_token is false in this file


def test_smollm2_logits_equal_transformers(smollm2, smollm2_hf, shared_data):
    (model, tok), (hf, _) = smollm2, smollm2_hf
    assert (model.cfg.n_layer, model.cfg.d_model, model.cfg.kv_heads, model.cfg.tie_embeddings) == (30, 576, 3, True)
    for text in (shared_texts(shared_data)[0][:600], SPANISH[1]):
        ids = tok.encode(text)
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0]
        got = logits(model, ids)
        print(f"SmolLM2 Q4_1, {len(ids)} tokens: max |yunque - transformers| = {(got - want).abs().max():.2e}")
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "La receta tradicional de la paella valenciana lleva", "Water boils at a temperature of")


def test_smollm2_greedy_text_equals_transformers(smollm2, smollm2_hf):
    """64 greedy tokens from yunque's engine (cached decode), checked against transformers by one forward pass over
    prompt + reply: greedy decoding gives the same tokens exactly when each is transformers' argmax there."""
    (model, tok), (hf, hf_tok) = smollm2, smollm2_hf
    engine = Engine(model, tok, precision="fp32")
    engine.stop_ids = set()  # all 64 tokens, even past an end of text
    prompts = [tok.encode(p) for p in PROMPTS]
    replies = engine.generate(prompts, SamplingParams(max_new_tokens=64, temperature=0))
    for prompt, reply in zip(prompts, replies):
        assert len(reply) == 64
        with torch.no_grad():
            want = hf(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1:-1].argmax(-1)
        assert reply == want.tolist(), tok.decode(reply)
        assert tok.decode(reply) == hf_tok.decode(want)


def test_chat_with_the_gguf_answers_paris(smollm2_gguf, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n"))
    assert main(["chat", str(smollm2_gguf), "--temperature", "0", "--max-new-tokens", "30",
                 "--precision", "fp32"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_smollm2_chat_format_and_stop_ids(smollm2_gguf, smollm2):
    _, tok = smollm2
    fmt = ChatFormat.of(smollm2_gguf, tok)
    assert fmt.kind == "template" and "<|im_end|>" in fmt.stop
    prompt = tok.decode(fmt.prompt([{"role": "user", "content": "Hi"}]))
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                         "<|im_start|>assistant\n")
    assert generation_stop_ids(smollm2_gguf, tok.vocab_size) == {2}


def test_import_refuses_to_write_over_its_source(tmp_path, tok):
    path = small_gguf(tmp_path, tok)
    with pytest.raises(ValueError, match="holds the input"):
        import_gguf(path, tmp_path)
