import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from yunque.config import preset
from yunque.engine import Engine, SamplingParams
from yunque.model import GPT
from yunque.tokenizer import byte_tokenizer

TOK = byte_tokenizer()  # ids 0..255 are bytes; EOS = 257, <|end|> = 262
GREEDY = SamplingParams(max_new_tokens=20, temperature=0)


def tiny_gpt(name: str = "tiny", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset(name, vocab_size=TOK.vocab_size, **overrides))


class Recorder(nn.Module):
    """Wraps a model and keeps the last-position logits of every forward."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model, self.cfg, self.logits = model, model.cfg, []

    def forward(self, ids, kv_cache=None):
        out = self.model(ids, kv_cache=kv_cache)
        self.logits.append(out[:, -1].clone())
        return out


class Scripted(nn.Module):
    """Fake model that emits `script` after a prompt of `prompt_len` tokens, then `after`; greedy only.

    Its logits depend only on the (padding-adjusted) position, like a real model's would on the sequence.
    """

    def __init__(self, script: list[int], *, prompt_len: int = 1, after: int = TOK.eos_id, vocab: int = 263,
                 max_seq_len: int = 64) -> None:
        super().__init__()
        self.cfg = preset("tiny", vocab_size=vocab, max_seq_len=max_seq_len)
        self.unused = nn.Parameter(torch.zeros(()))  # gives the engine a parameter dtype
        self.script, self.prompt_len, self.after = script, prompt_len, after

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        start = kv_cache.pos if kv_cache is not None else 0
        pos = torch.arange(start, start + T).expand(B, T)
        if kv_cache is not None:
            if kv_cache.pad is not None:
                pos = pos - kv_cache.pad.unsqueeze(1)
            kv_cache.advance(T)
        k = pos + 1 - self.prompt_len  # index into the script of the token predicted at each position
        table = torch.tensor(self.script + [self.after])
        targets = table[k.clamp(0, len(self.script))]
        return 10.0 * F.one_hot(targets, self.cfg.vocab_size).float()


class FakeTokenizer:
    """Tokens of several bytes each, to test stop strings that straddle tokens."""

    def __init__(self, pieces: list[str | bytes], bos: bool = True) -> None:
        self.pieces = [p.encode() if isinstance(p, str) else p for p in pieces] + [b"<eos>", b"<bos>"]
        self.eos_id, self.bos_id, self.pad_id = len(pieces), len(pieces) + 1 if bos else None, None
        self.special_ids = {"<|endoftext|>": self.eos_id}

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        assert text == "" and not eos, "only the empty text is needed here"
        return [self.bos_id] if bos else []

    def token_bytes(self, id: int) -> bytes:
        return self.pieces[id]

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def reference_greedy(model: GPT, prompt: list[int], n: int, stop_ids: set[int]) -> tuple[list[int], list]:
    """Greedy decoding by recomputing the whole sequence each step, without a cache."""
    seq, out, logits = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            last = model(torch.tensor([seq]))[0, -1]
            logits.append(last)
            token = int(last.argmax())
            if token in stop_ids:
                break
            seq.append(token)
            out.append(token)
    return out, logits


@pytest.mark.parametrize("name", ["tiny", "gpt2-tiny"])
def test_cached_decode_equals_full_recompute(name):
    model = tiny_gpt(name)
    engine = Engine(Recorder(model), TOK, precision="fp32")  # the reference recomputes in fp32
    prompt = TOK.encode("The quick brown fox", bos=True)
    [got] = engine.generate([prompt], GREEDY)
    want, want_logits = reference_greedy(model, prompt, GREEDY.max_new_tokens, engine.stop_ids)
    assert got == want
    rec = engine.model  # the engine's own copy of the Recorder
    assert len(rec.logits) == len(want_logits)
    for a, b in zip(rec.logits, want_logits):
        torch.testing.assert_close(a[0], b, atol=1e-5, rtol=0)


PROMPTS = [TOK.encode("hi"), TOK.encode("a longer one"), TOK.encode("and the longest prompt")]


def test_batched_equals_one_by_one_greedy():
    engine = Engine(tiny_gpt(), TOK)
    batch = engine.generate(PROMPTS, GREEDY)
    assert batch == [engine.generate([p], GREEDY)[0] for p in PROMPTS]


def test_batched_equals_one_by_one_seeded():
    engine = Engine(tiny_gpt(), TOK)
    params = SamplingParams(max_new_tokens=20, temperature=0.8, top_k=100, top_p=0.95, seed=11)
    batch = engine.generate(PROMPTS, params)
    alone = [engine.generate([p], SamplingParams(**{**params.__dict__, "seed": 11 + i}))[0]
             for i, p in enumerate(PROMPTS)]
    assert batch == alone
    assert engine.generate(PROMPTS, params) == batch  # and seeded runs repeat


def test_batched_equals_one_by_one_at_the_context_limit():
    # Short prompts are padded to the longest; once it has used up the context the others still have room.
    engine = Engine(tiny_gpt(max_seq_len=32), TOK)
    engine.stop_ids = set()  # run every row to its limit
    params = SamplingParams(max_new_tokens=100, temperature=0)
    batch = engine.generate(PROMPTS, params)
    assert [len(b) for b in batch] == [32 - len(p) for p in PROMPTS]
    assert batch == [engine.generate([p], params)[0] for p in PROMPTS]


def test_stream_equals_generate_text():
    engine = Engine(tiny_gpt(seed=3), TOK)
    text = "Once upon a time"
    for stop in [(), ("e", "\n")]:  # with seed 5 the second one stops at a "\n"
        params = SamplingParams(max_new_tokens=40, seed=5, stop=stop)
        [completion] = engine.generate_text([text], params)
        pieces = list(engine.stream(TOK.encode(text, bos=True), params))
        assert "".join(pieces) == completion.text
        assert all(pieces)


def test_multibyte_characters_are_never_split():
    text = "¡Olé! 😀"
    script = list(text.encode())
    engine = Engine(Scripted(script), TOK)
    pieces = list(engine.stream([TOK.bos_id], GREEDY))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "😀" in pieces  # its 4 byte tokens come out as one piece
    [c] = engine.generate_text([""], GREEDY)
    assert (c.text, c.token_ids, c.finish_reason, c.prompt_tokens) == (text, script, "stop", 1)


@pytest.mark.parametrize("text, stop, want", [
    ("Hi STOP there", ("STOP",), "Hi "),
    ("a ST b STOP c", ("STOP",), "a ST b "),  # a false start is released once disambiguated
    ("xyz\n\nmore", ("\n\n", "q"), "xyz"),
    ("no stop here", ("STOP",), "no stop here"),
])
def test_stop_strings_cut_and_are_never_yielded(text, stop, want):
    engine = Engine(Scripted(list(text.encode())), TOK)
    params = SamplingParams(max_new_tokens=30, temperature=0, stop=stop)
    pieces = list(engine.stream([TOK.bos_id], params))
    assert "".join(pieces) == want
    assert not any(s in p for p in pieces for s in stop)
    assert engine.generate([[TOK.bos_id]], params) == [list(want.encode())]
    assert engine.complete("", params) == want


def test_stop_string_straddling_tokens_cuts_the_ids_before_it():
    tok = FakeTokenizer(["Hel", "lo S", "TOP", "!"])
    engine = Engine(Scripted([0, 1, 2, 3], vocab=6), tok)
    params = SamplingParams(temperature=0, stop=("STOP",))
    [c] = engine.generate_text([""], params)
    assert (c.text, c.token_ids, c.finish_reason) == ("Hello ", [0], "stop")
    assert "".join(engine.stream([tok.bos_id], params)) == "Hello "


def test_stop_string_starting_inside_a_token_drops_that_token():
    tok = FakeTokenizer([b"ok \xc3", b"\xb1!", b"?"])  # the token holding "ok " also holds half of the "ñ"
    engine = Engine(Scripted([0, 1, 2], vocab=5), tok)
    [c] = engine.generate_text([""], SamplingParams(temperature=0, stop=("ñ!",)))
    assert (c.text, c.token_ids, c.finish_reason) == ("ok ", [], "stop")


def test_unfinished_character_at_the_end_is_replaced_as_in_decode():
    engine = Engine(Scripted(list("ñ".encode())), TOK)
    [c] = engine.generate_text([""], SamplingParams(max_new_tokens=1, temperature=0))
    assert (c.text, c.token_ids, c.finish_reason) == (TOK.decode(c.token_ids), [0xC3], "length")
    assert c.text == "\ufffd"


def test_stops_at_end_of_turn_token():
    end = TOK.special_ids["<|end|>"]
    engine = Engine(Scripted(list(b"ok"), after=end), TOK)
    [c] = engine.generate_text([""], GREEDY)
    assert (c.text, c.token_ids, c.finish_reason) == ("ok", list(b"ok"), "stop")


def test_max_new_tokens_is_respected():
    engine = Engine(Scripted(list(b"abcdefghij")), TOK)
    [c] = engine.generate_text([""], SamplingParams(max_new_tokens=4, temperature=0))
    assert (c.text, c.finish_reason) == ("abcd", "length")
    random = Engine(tiny_gpt(), TOK).generate(PROMPTS, SamplingParams(max_new_tokens=3, seed=0))
    assert all(len(ids) <= 3 for ids in random)


def test_generation_is_clamped_to_the_context():
    engine = Engine(Scripted(list(range(100)), prompt_len=10, max_seq_len=16), TOK)
    [c] = engine.generate_text(["123456789"], SamplingParams(max_new_tokens=50, temperature=0))  # BOS + 9 = 10
    assert (c.token_ids, c.finish_reason, c.prompt_tokens) == (list(range(6)), "length", 10)


def test_prompt_too_long_raises():
    engine = Engine(tiny_gpt(max_seq_len=16), TOK)
    with pytest.raises(ValueError, match="context is 16"):
        engine.generate([list(range(16))], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([[300]], GREEDY)


def test_empty_prompt_needs_bos():
    tok = FakeTokenizer(["a"], bos=False)
    engine = Engine(Scripted([0], vocab=3), tok)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], GREEDY)


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=2), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(stop="STOP"), "stop"),
    (dict(stop=("",)), "stop"),
])
def test_invalid_params_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)
