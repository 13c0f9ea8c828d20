"""Tokenizers: byte-level BPE and plain bytes on the Hugging Face `tokenizers` library."""

from yunque.tokenizer.bpe import SPECIAL_TOKENS, Tokenizer, byte_tokenizer, load_tokenizer, train_bpe

__all__ = ["Tokenizer", "train_bpe", "byte_tokenizer", "load_tokenizer", "SPECIAL_TOKENS"]
