"""Few-shot prompts: plain-text blocks for base models, prior turns for chat models, k=0 is zero-shot."""

import pytest

from yunque.eval.fewshot import build_prompt
from yunque.tokenizer.bpe import BOS, byte_tokenizer
from yunque.tokenizer.chat import render_prompt

TOK = byte_tokenizer()
EXAMPLES = [{"input": "2+2", "output": "4"}, {"input": "3+5", "output": "8"}, {"input": "1+1", "output": "2"}]


def test_base_model_prompt_is_input_output_blocks():
    ids = build_prompt(EXAMPLES, "7+1", 2, chat=False, tokenizer=TOK)
    assert ids[0] == TOK.bos_id
    assert TOK.decode(ids[1:]) == "Input: 2+2\nOutput: 4\n\nInput: 3+5\nOutput: 8\n\nInput: 7+1\nOutput:"
    assert TOK.decode(build_prompt(EXAMPLES, "7+1", 0, chat=False, tokenizer=TOK)) == BOS + "Input: 7+1\nOutput:"


def test_chat_model_prompt_is_prior_turns():
    ids = build_prompt(EXAMPLES, "7+1", 1, chat=True, tokenizer=TOK)
    assert ids == render_prompt(TOK, [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"},
                                      {"role": "user", "content": "7+1"}])
    assert build_prompt(EXAMPLES, "7+1", 0, chat=True, tokenizer=TOK) == \
        render_prompt(TOK, [{"role": "user", "content": "7+1"}])


def test_bad_k_or_examples():
    with pytest.raises(ValueError, match="k=4 but there are 3 examples"):
        build_prompt(EXAMPLES, "q", 4, chat=False, tokenizer=TOK)
    with pytest.raises(ValueError, match="example 0"):
        build_prompt([{"question": "a"}], "q", 1, chat=True, tokenizer=TOK)
