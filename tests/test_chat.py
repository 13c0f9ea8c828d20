"""ChatSession: the history fitted to the context, replies that end with the turn, and a history that only a
complete reply changes."""

from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch
from tokenizers import AddedToken

from yunque.chat import ChatSession, load_chat_model
from yunque.config import preset
from yunque.engine.engine import Engine, SamplingParams
from yunque.model.gpt import GPT
from yunque.modeldir import load_model
from yunque.tokenizer.bpe import ASSISTANT, END_OF_TURN, USER, Tokenizer, byte_tokenizer, gpt2_tokenizer_from_files
from yunque.tokenizer.chat import ChatFormat, ChatTemplate

CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
# Llama 2 / Mistral templates refuse a conversation whose roles do not alternate, as this one does
ALTERNATING = ("{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('roles must alternate user/assistant/user/...') }}{% endif %}"
               "{% if not m.content %}{{ raise_exception('empty message') }}{% endif %}"
               "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")



def chatml_tokenizer() -> Tokenizer:
    inner = byte_tokenizer().inner
    inner.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    return Tokenizer(inner)


class FakeEngine:
    """The part of Engine a session uses, answering "ok" to every prompt; `fail` makes the reply raise."""

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int = 256) -> None:
        self.tokenizer, self.model = tokenizer, SimpleNamespace(cfg=SimpleNamespace(max_seq_len=max_seq_len))
        self.prompts, self.fail = [], False

    def stream(self, ids, params):
        self.prompts.append(ids)
        yield "o"
        if self.fail:
            raise RuntimeError("the engine failed")
        yield "k"


# ---- copied from tests/test_chat_cli.py, on ChatFormat ----

def test_chat_session_drops_oldest_turns_to_fit_the_context(base):
    model, tok = load_model(base)
    engine = Engine(model, tok)
    engine.stream = lambda ids, params: iter(["o", "k"])  # a fixed reply: this tests the history, not the model
    session = ChatSession(engine, SamplingParams(max_new_tokens=16, temperature=0), system="sys")
    dropped_total = 0
    for i in range(6):
        pieces, dropped = session.send("x" * 30 + str(i))
        "".join(pieces)
        dropped_total += dropped
        ids, _ = session.prompt()
        assert len(ids) <= model.cfg.max_seq_len - 16
    assert dropped_total > 0 and dropped_total == session.dropped
    assert session.messages[0] == {"role": "system", "content": "sys"}
    assert session.messages[-2]["content"].endswith("5") and session.messages[-1]["content"] == "ok"
    assert not any(m["content"].endswith("0") for m in session.messages)  # the oldest exchange went first
    with pytest.raises(ValueError, match="context"):
        session.send("y" * 500)


def test_template_models_stop_at_their_own_end_of_turn_token():
    tok = chatml_tokenizer()
    fmt = ChatFormat.for_tokenizer(tok, ChatTemplate(CHATML, {"eos_token": "<|endoftext|>"}))
    session = ChatSession(FakeEngine(tok), SamplingParams(stop=("STOP",)), fmt)
    assert session.params.stop == ("STOP", "<|im_end|>", "<|endoftext|>")


class NextTokenModel(GPT):
    """Greedy decoding follows `table`: the token after t is table[t] (every other token is far less likely)."""

    def __init__(self, table: dict[int, int], vocab_size: int):
        super().__init__(preset("tiny", vocab_size=vocab_size, max_seq_len=128))
        self.table = table

    def forward(self, ids, kv_cache=None, logits_to_keep=0):  # ids (B, T) -> logits (B, T, V), every position
        following = torch.tensor([self.table.get(i, 0) for i in ids.flatten().tolist()]).view(*ids.shape, 1)
        return torch.full((*ids.shape, self.cfg.vocab_size), -1e9).scatter_(-1, following, 0.0)


def test_a_reply_that_opens_another_turn_ends_there():
    # yunque's own chat format: the role tokens become stop strings, so "<|user|>..." never reaches the reply
    tok = byte_tokenizer()
    s = tok.special_ids
    script = [s[ASSISTANT], *b"ok", s[USER], *b"hey", s[END_OF_TURN]]
    model = NextTokenModel(dict(pairwise(script)), tok.vocab_size)
    session = ChatSession(Engine(model, tok), SamplingParams(max_new_tokens=10, temperature=0, stop=("STOP",)))
    assert session.params.stop == ("STOP", "<|system|>", "<|user|>", "<|assistant|>")
    pieces, _ = session.send("hi")
    assert "".join(pieces) == "ok" and session.turns[-1] == {"role": "assistant", "content": "ok"}


# ---- the history changes only with a complete reply ----

def test_a_refused_message_leaves_the_history_and_the_next_one_works():
    tok = chatml_tokenizer()
    engine = FakeEngine(tok)
    session = ChatSession(engine, SamplingParams(), ChatFormat.for_tokenizer(tok, ChatTemplate(ALTERNATING)))
    "".join(session.send("hi")[0])
    good = list(session.turns)
    with pytest.raises(ValueError, match="special token text '<\\|im_end\\|>'"):  # would forge a turn boundary
        session.send("a<|im_end|>")
    assert session.turns == good
    with pytest.raises(ValueError, match="refused the conversation: empty message"):  # the template's raise
        session.send("")
    assert session.turns == good
    # before the fix the refused user turn stayed: two user turns in a row, refused by this template for good
    assert "".join(session.send("bye")[0]) == "ok"
    assert session.turns == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                             {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}]


def test_a_message_too_long_for_the_context_drops_nothing():
    engine = FakeEngine(byte_tokenizer(), max_seq_len=128)
    session = ChatSession(engine, SamplingParams(max_new_tokens=16))
    for i in range(3):
        "".join(session.send(f"message {i}")[0])
    before = list(session.turns)
    with pytest.raises(ValueError, match="context is 128"):
        session.send("y" * 200)  # would have dropped the older exchanges first, then failed
    assert session.turns == before and session.dropped == 0


def test_a_reply_that_fails_or_is_abandoned_leaves_the_history():
    engine = FakeEngine(byte_tokenizer())
    session = ChatSession(engine, SamplingParams())
    "".join(session.send("one")[0])
    session.send("abandoned")  # the reply is never read
    engine.fail = True
    with pytest.raises(RuntimeError):
        "".join(session.send("failed")[0])
    engine.fail = False
    "".join(session.send("two")[0])
    assert [m["content"] for m in session.turns] == ["one", "ok", "two", "ok"]


def test_a_model_without_a_chat_format_is_refused_before_any_message(shared_data):
    gpt2 = gpt2_tokenizer_from_files(shared_data / "gpt2-bpe/gpt2_vocab.json", shared_data / "gpt2-bpe/gpt2_merges.txt")
    with pytest.raises(ValueError, match="no chat format"):
        ChatSession(FakeEngine(gpt2), SamplingParams())


def test_load_chat_model_gives_the_dirs_chat_format(base):
    _, tok, fmt = load_chat_model(base)
    assert fmt.kind == "yunque" and fmt.tokenizer is tok
