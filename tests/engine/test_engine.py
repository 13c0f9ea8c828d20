"""The engine: cached decode against full recompute, batching, stop logic and text, and the step API (rows that
join and leave a running batch equal each generated alone), logprobs, finish reasons, load_weights."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from yunque.config import preset
from yunque.engine import Engine, SamplingParams
from yunque.engine.engine import _runs
from yunque.engine.prefix import PrefixCache
from yunque.model import GPT
from yunque.precision import bf16_supported
from yunque.tokenizer import byte_tokenizer

TOK = byte_tokenizer()  # ids 0..255 are bytes; EOS = 257, <|end|> = 262
GREEDY = SamplingParams(max_new_tokens=20, temperature=0)
needs_bf16 = pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no native bf16 matrix products")


def tiny_gpt(name: str = "tiny", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset(name, vocab_size=TOK.vocab_size, **overrides))


class Recorder(nn.Module):
    """Wraps a model and keeps the last-position logits of every forward."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model, self.cfg, self.logits = model, model.cfg, []

    def forward(self, ids, kv_cache=None, logits_to_keep=0):
        out = self.model(ids, kv_cache=kv_cache, logits_to_keep=logits_to_keep)
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

    def forward(self, ids, kv_cache=None, logits_to_keep=0):  # every position's logits, whatever it keeps
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
    [c] = engine.generate_text(["The quick brown fox"], replace(GREEDY, logprobs=True))  # the prompt, with BOS
    want_logprobs = [float(lg.log_softmax(-1)[t]) for lg, t in zip(want_logits, want)]
    assert c.token_ids == want and c.logprobs == pytest.approx(want_logprobs, abs=1e-5)


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
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"stop": "STOP"}, "stop"),
    ({"stop": ("",)}, "stop"),
])
def test_invalid_params_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


# -- the step API ------------------------------------------------------------------------------------------------

A, B, C = TOK.encode("a prompt of middling length"), TOK.encode("hi"), TOK.encode("x" * 20 + " and a longer prompt")
MODES = {
    "greedy": [SamplingParams(max_new_tokens=n, temperature=0, logprobs=True) for n in (30, 40, 20)],
    "seeded": [SamplingParams(max_new_tokens=n, temperature=t, top_k=k, top_p=p, seed=s, logprobs=True)
               for n, t, k, p, s in ((30, 0.9, None, None, 1), (40, 0.8, 50, None, 2), (20, 1.0, None, 0.9, 3))],
    "mixed": [SamplingParams(max_new_tokens=30, temperature=0, logprobs=True),
              SamplingParams(max_new_tokens=40, seed=2),  # without logprobs
              SamplingParams(max_new_tokens=20, temperature=0.7, top_k=20, seed=3, logprobs=True)],
}


def run_out(engine: Engine, batch) -> None:
    """Step the batch until no row runs, removing finished rows as they finish."""
    while batch.running:
        engine.step(batch)
        engine.remove(batch, *(r for r in batch.rows if r.done))


def assert_each_as_alone(engine: Engine, runs) -> None:
    """Each (row, prompt, params) of `runs`, run out, has the tokens, finish and logprobs `add` gives it alone."""
    for row, prompt, params in runs:
        want = engine.new_batch()
        w = engine.add(want, prompt, params)
        run_out(engine, want)
        assert (row.ids, row.finish_reason) == (w.ids, w.finish_reason)
        if params.logprobs:
            assert row.logprobs == pytest.approx(w.logprobs, abs=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_rows_joining_midway_and_leaving_early_equal_each_alone(mode):
    # A runs alone for 5 steps (fill level 33); B joins with a shorter prompt (padded), C three steps later with
    # a longer one (A and B get more padding); B leaves early, unfinished; each row's tokens and logprobs are
    # those it gets in a batch of its own.
    engine = Engine(tiny_gpt(), TOK)
    engine.stop_ids = set()  # every row runs to its budget
    pa, pb, pc = MODES[mode]
    batch = engine.new_batch()
    a = engine.add(batch, A, pa)
    for _ in range(5):
        engine.step(batch)
    b = engine.add(batch, B, pb)
    assert batch.filled == len(A) + 5 > len(B)
    for _ in range(3):
        engine.step(batch)
    c = engine.add(batch, C, pc)
    assert len(C) > len(A) + 8 and batch.filled == len(C)
    for _ in range(6):
        sampled = engine.step(batch)
        assert [s.row for s in sampled] == [a, b, c]
    engine.remove(batch, b)
    assert batch.rows == [a, c] and batch.cache.batch_size == 2
    run_out(engine, batch)
    assert len(batch) == 0 and batch.cache is None
    for row, prompt, params in ((a, A, pa), (b, B, pb), (c, C, pc)):
        solo = engine.new_batch()
        want = engine.add(solo, prompt, params)
        run_out(engine, solo)
        assert want.ids == engine.generate([prompt], params)[0]
        n = len(row.ids)
        assert row.ids == want.ids[:n]
        if params.logprobs:
            assert row.logprobs == pytest.approx(want.logprobs[:n], abs=1e-4)
        else:
            assert row.logprobs is want.logprobs is None
        assert n == (len(want.ids) if row is not b else 1 + 3 + 6)
    assert (a.finish_reason, b.finish_reason, c.finish_reason) == ("length", None, "length")


@pytest.mark.parametrize("mode", MODES)
def test_padding_left_by_a_removed_row_goes_and_changes_nothing(mode):
    # C (the longest prompt) runs 4 steps, B joins padded to C's fill level; C leaves: B's padding, more than a
    # quarter of the cache's fill, is dropped at once, and B goes on as it would alone.
    engine = Engine(tiny_gpt(), TOK)
    engine.stop_ids = set()
    _, pb, pc = MODES[mode]
    batch = engine.new_batch()
    c = engine.add(batch, C, pc)
    for _ in range(4):
        engine.step(batch)
    b = engine.add(batch, B, pb)
    engine.step(batch)
    engine.remove(batch, c)
    assert batch.filled == len(B) + 1 and batch.cache.pad is not None and int(batch.cache.pad.min()) == 0
    run_out(engine, batch)
    want = engine.new_batch()
    w = engine.add(want, B, pb)
    run_out(engine, want)
    assert b.ids == w.ids
    if pb.logprobs:
        assert b.logprobs == pytest.approx(w.logprobs, abs=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_prefill_equals_adding_whole(mode):
    # A and C are prefilled 7 tokens at a time (begin/prefill) while B decodes, then join it together; the first
    # joins of an empty batch likewise. Each row is what `add` makes of its prompt alone.
    engine = Engine(tiny_gpt(), TOK)
    engine.stop_ids = set()
    pa, pb, pc = MODES[mode]
    batch = engine.new_batch()
    b = engine.add(batch, B, pb)
    pending = [engine.begin(A, pa), engine.begin(C, pc)]
    while not all(p.done for p in pending):
        for p in pending:
            if not p.done:
                left = len(p.prompt) - p.filled
                assert engine.prefill(p, 7) == min(7, left) and p.filled <= len(p.prompt)
        engine.step(batch)
    a, c = engine.join(batch, pending)
    assert batch.rows == [b, a, c]
    run_out(engine, batch)
    empty = engine.new_batch()
    first = engine.begin(C, pc)
    while not first.done:
        engine.prefill(first, 5)
    (c2,) = engine.join(empty, [first])
    run_out(engine, empty)
    assert_each_as_alone(engine, ((a, A, pa), (c, C, pc), (c2, C, pc)))


@pytest.mark.parametrize("mode", MODES)
def test_prompts_prefilled_together_join_as_views_and_equal_each_alone(mode):
    # A, B, C prefilled in one forward (left-padded to C's length): each pending shows its row of that forward's
    # cache (no copy), keeps its padding out of `filled`, and the three join a running batch in one part; a
    # prefix cache fed from a padded row stores what an unpadded prefill would. Each row is what `add` makes alone.
    engine = Engine(tiny_gpt(), TOK)
    engine.stop_ids = set()
    pa, pb, pc = MODES[mode]
    batch = engine.new_batch()
    d = engine.add(batch, B, pb)
    engine.step(batch)
    pending = [engine.begin(A, pa), engine.begin(B, pb), engine.begin(C, pc)]
    engine.prefill_many(pending)
    group = pending[0].group[0]
    assert [p.group for p in pending] == [(group, 0), (group, 1), (group, 2)]
    assert all(p.done and p.filled == len(p.prompt) for p in pending)
    buffer = group.k[0]
    for i, p in enumerate(pending):
        assert p.cache.k[0].data_ptr() == buffer[i].data_ptr()  # a view of the forward's cache, not a copy
        assert int(p.cache.pad[0]) == len(C) - len(p.prompt)
    (run,) = _runs(pending)
    assert run.batch_size == 3 and run.k[0].data_ptr() == buffer.data_ptr()
    prefixes, alone = PrefixCache(block=4), PrefixCache(block=4)
    prefixes.store(A, pending[0].cache)
    solo = engine.begin(A, pa)
    engine.prefill(solo, len(A))
    alone.store(A, solo.cache)
    k, v = prefixes.lookup(A + [1])
    k2, v2 = alone.lookup(A + [1])
    assert k[0].shape[2] == len(A) // 4 * 4
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(k + v, k2 + v2))
    a, b, c = engine.join(batch, pending)
    assert batch.rows == [d, a, b, c]
    run_out(engine, batch)
    assert_each_as_alone(engine, ((a, A, pa), (b, B, pb), (c, C, pc)))


def test_a_seeded_rows_uniform_numbers_are_its_generators_one_a_step():
    # drawn UNIFORMS_AHEAD at a time, they are the numbers torch.rand(1) would give one step after another
    engine = Engine(tiny_gpt(), TOK)
    row = engine._row([1, 2], SamplingParams(seed=7, temperature=1.0))
    g = torch.Generator().manual_seed(7)
    assert [row._uniform() for _ in range(150)] == [torch.rand(1, generator=g).item() for _ in range(150)]


def test_removing_a_row_leaves_the_others_unchanged():
    engine = Engine(tiny_gpt(), TOK)
    params = SamplingParams(max_new_tokens=25, temperature=0.8, seed=4, logprobs=True)
    full = engine.new_batch()
    rows = engine.add_many(full, PROMPTS, [replace(params, seed=4 + i) for i in range(3)])
    run_out(engine, full)
    cut = engine.new_batch()
    kept = engine.add_many(cut, PROMPTS, [replace(params, seed=4 + i) for i in range(3)])
    for _ in range(3):
        engine.step(cut)
    engine.remove(cut, kept[1])
    run_out(engine, cut)
    for i in (0, 2):
        assert kept[i].ids == rows[i].ids and kept[i].finish_reason == rows[i].finish_reason
        assert kept[i].logprobs == pytest.approx(rows[i].logprobs, abs=1e-5)
    assert kept[1].ids == rows[1].ids[:4]


def test_step_reports_tokens_logprobs_and_finish_reasons():
    engine = Engine(Scripted(list(b"abc")), TOK)
    batch = engine.new_batch()
    params = replace(GREEDY, logprobs=True)
    long, short = engine.add_many(batch, [[TOK.bos_id]] * 2, [params, replace(params, max_new_tokens=2)])
    assert long.ids == short.ids == list(b"a") and long.finish_reason is None
    lp = 10 - math.log(math.exp(10) + 262)  # the Scripted model's logits: 10 for its token, 0 for 262 others
    assert long.logprobs == pytest.approx([lp], abs=1e-6)
    first = engine.step(batch)
    assert [(s.row, s.id, s.finish_reason) for s in first] == [(long, ord("b"), None), (short, ord("b"), "length")]
    assert first[0].logprob == pytest.approx(lp, abs=1e-6)
    assert [(s.row, s.id) for s in engine.step(batch)] == [(long, ord("c"))]  # a finished row is skipped
    assert len(batch) == 2  # ... until it is removed
    [end] = engine.step(batch)
    assert (end.id, end.finish_reason, long.finish_reason) == (TOK.eos_id, "stop", "stop")
    assert long.ids == list(b"abc") and len(long.logprobs) == 3  # the stop token is reported, not kept
    assert engine.step(batch) == []
    engine.remove(batch, long, short)
    engine.remove(batch, long)  # rows no longer in the batch are ignored
    assert len(batch) == 0 and batch.cache is None
    [again] = engine.add_many(batch, [[TOK.bos_id]], GREEDY)  # an emptied batch takes new rows
    assert [s.logprob for s in engine.step(batch)] == [None]  # logprobs only when asked for
    run_out(engine, batch)
    assert (again.ids, again.logprobs) == (list(b"abc"), None)
    assert engine.generate_text([""], GREEDY)[0].logprobs is None


def test_a_row_finished_by_its_first_token_rides_along_until_removed():
    engine = Engine(Scripted([TOK.eos_id]), TOK)
    batch = engine.new_batch()
    row = engine.add(batch, [TOK.bos_id], GREEDY)
    assert (row.ids, row.finish_reason, batch.running) == ([], "stop", [])
    assert engine.step(batch) == []


def test_token_budget_is_capped_by_the_context():
    engine = Engine(tiny_gpt(max_seq_len=16), TOK)
    assert engine.token_budget(10, 50) == 6 and engine.token_budget(3, 5) == 5
    with pytest.raises(ValueError, match="context is 16"):
        engine.token_budget(16, 1)
    row = engine.add(engine.new_batch(), list(range(10)), SamplingParams(max_new_tokens=50))
    assert row.budget == 6


def test_add_checks_before_touching_the_batch():
    engine = Engine(tiny_gpt(max_seq_len=16), TOK)
    batch = engine.new_batch()
    engine.add(batch, [1, 2], GREEDY)
    with pytest.raises(ValueError, match="context is 16"):
        engine.add_many(batch, [[3], list(range(16))], GREEDY)
    with pytest.raises(ValueError, match="one each"):
        engine.add_many(batch, [[3], [4]], [GREEDY] * 3)
    assert len(batch) == 1 and batch.cache.batch_size == 1


# -- load_weights --------------------------------------------------------------------------------------------------

def train_a_little(model: GPT) -> None:
    """A few optimizer steps on one text: enough to change the model's greedy output."""
    ids = torch.tensor([TOK.encode("the cat sat on the mat. " * 4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(5):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_load_weights_follows_the_training_model(precision):
    model = tiny_gpt()
    engine = Engine(model, TOK, precision=precision)
    prompt = [TOK.encode("the cat")]
    before = engine.generate(prompt, GREEDY)
    train_a_little(model)
    assert engine.generate(prompt, GREEDY) == before  # the engine decodes with its own copy
    fresh = Engine(model, TOK, precision=precision).generate(prompt, GREEDY)
    assert fresh != before
    engine.load_weights(model)
    assert engine.generate(prompt, GREEDY) == fresh
    with pytest.raises(ValueError, match="config"):
        engine.load_weights(tiny_gpt(n_layer=1))
