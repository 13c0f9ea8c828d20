"""Few-shot prompts: plain-text blocks for base models, prior turns for chat models, k=0 is zero-shot; the stop
strings that end the answer."""

import pytest

from yunque.eval.fewshot import answer_stop, build_prompt
from yunque.tokenizer.bpe import BOS, byte_tokenizer, gpt2_tokenizer_from_files
from yunque.tokenizer.chat import ChatFormat, render_prompt

TOK = byte_tokenizer()
FMT = ChatFormat.for_tokenizer(TOK)
EXAMPLES = [{"input": "2+2", "output": "4"}, {"input": "3+5", "output": "8"}, {"input": "1+1", "output": "2"}]


def test_base_model_prompt_is_input_output_blocks_ended_by_a_blank_line(shared_data):
    plain = ChatFormat.for_tokenizer(gpt2_tokenizer_from_files(shared_data / "gpt2-bpe/gpt2_vocab.json",
                                                               shared_data / "gpt2-bpe/gpt2_merges.txt"))
    blocks = "Input: 2+2\nOutput: 4\n\nInput: 3+5\nOutput: 8\n\nInput: 7+1\nOutput:"
    assert plain.tokenizer.decode(build_prompt(EXAMPLES, "7+1", 2, plain)) == blocks  # GPT-2 has no BOS
    assert answer_stop(plain) == ("\n\n",)
    # a base model yunque pretrained has the chat tokens already: chat=False asks for plain text, with BOS
    ids = build_prompt(EXAMPLES, "7+1", 2, FMT, chat=False)
    assert ids[0] == TOK.bos_id and TOK.decode(ids[1:]) == blocks
    assert TOK.decode(build_prompt(EXAMPLES, "7+1", 0, FMT, chat=False)) == BOS + "Input: 7+1\nOutput:"
    assert answer_stop(FMT, chat=False) == ("\n\n",)


def test_chat_model_prompt_is_prior_turns_ended_with_the_turn():
    ids = build_prompt(EXAMPLES, "7+1", 1, FMT)
    assert ids == render_prompt(TOK, [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"},
                                      {"role": "user", "content": "7+1"}])
    assert build_prompt(EXAMPLES, "7+1", 0, FMT) == render_prompt(TOK, [{"role": "user", "content": "7+1"}])
    assert answer_stop(FMT) == FMT.stop


def test_template_model_prompt_is_its_own_turns(chatml):
    fmt, tok = chatml, chatml.tokenizer
    assert tok.decode(build_prompt(EXAMPLES, "7+1", 1, fmt)) == ("<|im_start|>user\n2+2<|im_end|>\n"
                                                                 "<|im_start|>assistant\n4<|im_end|>\n"
                                                                 "<|im_start|>user\n7+1<|im_end|>\n"
                                                                 "<|im_start|>assistant\n")
    assert answer_stop(fmt) == ("<|im_end|>",)


def test_bad_k_or_examples():
    with pytest.raises(ValueError, match="k=4 but there are 3 examples"):
        build_prompt(EXAMPLES, "q", 4, FMT, chat=False)
    with pytest.raises(ValueError, match="example 0"):
        build_prompt([{"question": "a"}], "q", 1, FMT)
