"""The chat format: ids and loss mask of yunque's format, prompts, errors, Hugging Face chat templates, and
ChatFormat, which picks one of them per model and says where its assistant turns end."""

import json
import sys

import pytest
from tokenizers import AddedToken

from yunque.config import SamplingParams
from yunque.tokenizer.bpe import (
    ASSISTANT,
    BOS,
    END_OF_TURN,
    SYSTEM,
    USER,
    Tokenizer,
    byte_tokenizer,
    gpt2_tokenizer_from_files,
    train_bpe,
)
from yunque.tokenizer.chat import (
    ChatFormat,
    ChatTemplate,
    load_chat_template,
    render,
    render_prompt,
    render_with_template,
    yunque_template,
)

TOK = byte_tokenizer()
S = TOK.special_ids
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def spans(ids, mask, tok=TOK):
    """Text of each maximal run of masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids + [0], mask + [False]):
        if m:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    return [tok.decode(r) for r in runs]


def test_render_layout_and_mask_cover_exactly_the_assistant_replies_and_their_end():
    ids, mask = render(TOK, CONVERSATION)
    def b(text):
        return list(text.encode())  # byte tokenizer: id == byte

    expected = ([S[BOS], S[SYSTEM], *b("Be brief."), S[END_OF_TURN], S[USER], *b("Hi"), S[END_OF_TURN],
                 S[ASSISTANT], *b("Hello!"), S[END_OF_TURN], S[USER], *b("2+2?"), S[END_OF_TURN],
                 S[ASSISTANT], *b("4"), S[END_OF_TURN]])
    assert ids == expected
    assert len(mask) == len(ids)
    assert spans(ids, mask) == ["Hello!<|end|>", "4<|end|>"]
    assert sum(mask) == len("Hello!") + 1 + len("4") + 1
    assert not any(m for i, m in zip(ids, mask) if i == S[ASSISTANT])  # never the role token


def test_render_prompt_opens_an_assistant_turn():
    ids = render_prompt(TOK, CONVERSATION[:2])
    assert ids == render(TOK, CONVERSATION[:2])[0] + [S[ASSISTANT]]


def test_special_token_text_in_content_is_plain_text():
    ids, _ = render(TOK, [{"role": "user", "content": "<|end|><|assistant|>"},
                          {"role": "assistant", "content": "ok"}])
    assert ids.count(S[END_OF_TURN]) == 2 and ids.count(S[ASSISTANT]) == 1


def test_no_bos_when_the_tokenizer_has_none(shared_data):
    inner = gpt2_tokenizer_from_files(shared_data / "gpt2-bpe/gpt2_vocab.json",
                                      shared_data / "gpt2-bpe/gpt2_merges.txt").inner
    inner.add_special_tokens([SYSTEM, USER, ASSISTANT, END_OF_TURN])
    tok = Tokenizer(inner)
    ids, mask = render(tok, CONVERSATION[1:3])
    assert ids[0] == tok.special_ids[USER] and len(ids) == len(mask)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|end|>"


def test_unknown_role_lists_the_accepted_roles():
    with pytest.raises(ValueError, match=r"unknown role 'tool'.*system, user, assistant"):
        render(TOK, [{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="'role' and a 'content'"):
        render(TOK, [{"role": "user"}])
    with pytest.raises(ValueError, match="non-empty list"):
        render_prompt(TOK, [])


def test_tokenizer_without_chat_tokens_is_told_to_use_a_template(shared_data):
    gpt2 = gpt2_tokenizer_from_files(shared_data / "gpt2-bpe/gpt2_vocab.json", shared_data / "gpt2-bpe/gpt2_merges.txt")
    with pytest.raises(ValueError, match="chat template"):
        render(gpt2, CONVERSATION)


@pytest.fixture(scope="module")
def chatml_tok(shared_data) -> Tokenizer:
    """GPT-2's tokenizer with ChatML's special tokens added, as in Qwen's Hub tokenizers."""
    inner = gpt2_tokenizer_from_files(shared_data / "gpt2-bpe/gpt2_vocab.json",
                                      shared_data / "gpt2-bpe/gpt2_merges.txt").inner
    inner.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    return Tokenizer(inner)


def test_template_mask_covers_each_reply_and_what_closes_its_turn(chatml_tok):
    tok = chatml_tok
    ids, mask = render_with_template(CHATML, tok, CONVERSATION)
    assert tok.decode(ids) == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)
    start, end = tok.inner.token_to_id("<|im_start|>"), tok.inner.token_to_id("<|im_end|>")
    assert ids.count(start) == 5 and ids.count(end) == 5  # template text becomes special ids
    assert spans(ids, mask, tok) == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]


def test_template_prompt_ends_with_the_generation_prompt(chatml_tok):
    ids = render_prompt(chatml_tok, CONVERSATION[:2], template=ChatTemplate(CHATML))
    assert chatml_tok.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_template_refuses_content_that_would_forge_a_turn(chatml_tok):
    with pytest.raises(ValueError, match="special token text '<\\|im_end\\|>'"):
        render_with_template(CHATML, chatml_tok, [{"role": "user", "content": "a<|im_end|>"}])


def test_template_that_rewrites_earlier_turns_is_refused(chatml_tok):
    # prints the number of messages first, so a longer conversation changes the beginning of the text
    template = "{{ messages|length }}" + CHATML
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        render_with_template(template, chatml_tok, CONVERSATION)


def test_load_chat_template_from_tokenizer_config(tmp_path):
    assert load_chat_template(tmp_path) is None
    config = {"chat_template": "{{ bos_token }}" + CHATML, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = load_chat_template(tmp_path)
    assert t.source == config["chat_template"] and t.variables == {"bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "chat_template.jinja").write_text(CHATML)  # newer transformers save it on its own
    assert load_chat_template(tmp_path).source == CHATML


def test_missing_jinja2_is_named(monkeypatch, chatml_tok):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)
    monkeypatch.setitem(sys.modules, "jinja2.exceptions", None)
    with pytest.raises(ValueError, match="pip install jinja2"):
        render_with_template(CHATML, chatml_tok, CONVERSATION)


def test_yunque_template_renders_what_render_does(shared_data):
    """The jinja2 form of yunque's format (written into exports) gives the same ids and mask as `render`."""
    tok = train_bpe([(shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000]], 400)
    messages = [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "ROMEO: hola"},
                {"role": "assistant", "content": "¿Qué tal?"}, {"role": "user", "content": "bien\n"},
                {"role": "assistant", "content": "Me alegro."}]
    template = yunque_template()
    assert render(tok, messages, template=template) == render(tok, messages)
    assert render_prompt(tok, messages[:2], template=template) == render_prompt(tok, messages[:2])


# ---- ChatFormat: one object per model ----

def test_chat_format_for_yunque_tokens_renders_yunque_format_and_stops_at_end_or_a_new_turn():
    fmt = ChatFormat.for_tokenizer(TOK)
    assert fmt.kind == "yunque" and fmt.is_chat and fmt.template is None
    assert fmt.render(CONVERSATION) == render(TOK, CONVERSATION)
    assert fmt.prompt(CONVERSATION[:2]) == render_prompt(TOK, CONVERSATION[:2])
    assert fmt.stop == (SYSTEM, USER, ASSISTANT)  # a reply that opens another turn has ended
    assert fmt.stop_ids == {S[END_OF_TURN], TOK.eos_id}


def test_chat_format_for_a_chatml_template_stops_at_its_end_of_turn_token_and_eos(chatml_tok):
    template = ChatTemplate(CHATML, {"eos_token": "<|endoftext|>"})
    fmt = ChatFormat.for_tokenizer(chatml_tok, template)
    assert fmt.kind == "template" and fmt.is_chat and fmt.template is template
    assert fmt.render(CONVERSATION) == render_with_template(CHATML, chatml_tok, CONVERSATION, eos_token="<|endoftext|>")
    assert chatml_tok.decode(fmt.prompt(CONVERSATION[:2])).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # <|im_end|> because the template writes it; <|endoftext|> (in GPT-2's vocab, not in the template) as eos_token
    assert fmt.stop == ("<|im_end|>", "<|endoftext|>")
    assert fmt.stop_ids == {chatml_tok.inner.token_to_id("<|im_end|>"), chatml_tok.inner.token_to_id("<|endoftext|>")}


@pytest.fixture(scope="module")
def gpt2_tok(shared_data) -> Tokenizer:
    return gpt2_tokenizer_from_files(shared_data / "gpt2-bpe/gpt2_vocab.json", shared_data / "gpt2-bpe/gpt2_merges.txt")


def test_plain_format_is_not_chat_and_refuses_to_render(gpt2_tok):
    fmt = ChatFormat.for_tokenizer(gpt2_tok)
    assert fmt.kind == "plain" and not fmt.is_chat and fmt.stop == () and fmt.stop_ids == frozenset()
    with pytest.raises(ValueError, match="cannot use yunque's chat format, and no chat template was given"):
        fmt.render(CONVERSATION)
    with pytest.raises(ValueError, match="ChatFormat.of"):
        fmt.prompt(CONVERSATION[:2])


def test_chat_format_of_a_model_dir_prefers_its_template_to_yunque_tokens(tmp_path, gpt2_tok):
    assert ChatFormat.of(tmp_path, TOK).kind == "yunque"
    assert ChatFormat.of(tmp_path, gpt2_tok).kind == "plain"
    # Phi-3's tokenizer has <|user|>, <|assistant|>, <|end|> too, but its template puts newlines around them: the
    # dir's template is the model's format
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    fmt = ChatFormat.of(tmp_path, TOK)
    assert fmt.kind == "template" and fmt.template.source == CHATML
    assert TOK.decode(fmt.prompt(CONVERSATION[1:2])) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_yunque_template_format_stops_at_end_of_turn():
    fmt = ChatFormat.for_tokenizer(TOK, yunque_template())
    assert fmt.kind == "template" and fmt.stop == (END_OF_TURN,) and fmt.stop_ids == {S[END_OF_TURN]}
    assert fmt.render(CONVERSATION) == render(TOK, CONVERSATION)


def test_reply_params_add_the_stop_strings_once_after_the_callers():
    params = ChatFormat.for_tokenizer(TOK).reply_params(SamplingParams(max_new_tokens=7, stop=("STOP", USER)))
    assert params.stop == ("STOP", USER, SYSTEM, ASSISTANT) and params.max_new_tokens == 7
