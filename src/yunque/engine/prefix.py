"""The shared-prefix cache: keys and values of prompts' beginnings, kept so that a prompt starting the same way (a
common system prompt, the earlier turns of a conversation) does not run them through the model again.

Prompts are cut into blocks of `block` tokens, as vLLM's automatic prefix caching does; a block's keys and values
depend on every token before it, so blocks form a trie: a block is found by its parent and its own tokens, and a
lookup walks the prompt's blocks from the start for as long as they are known. Blocks are compared by their tokens
(no hashes that could collide). The least recently used blocks with no children go when more than `max_tokens`
are kept. The keys and values are those a one-row, unpadded prefill computed (`Engine.begin`), so a prompt
prefilled from them sees what it would have computed itself (tests/engine/test_scheduler.py: the same outputs
with and without the cache).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch

from yunque.model.kv_cache import KVCache


class _Block:
    __slots__ = ("id", "key", "k", "v", "children")

    def __init__(self, key: tuple, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        self.id, self.key, self.k, self.v, self.children = next(_ids), key, k, v, 0


_ids = itertools.count(1)  # 0 is the root, the empty prefix


class PrefixCache:
    """Keys and values of prompt prefixes, by whole blocks of tokens, least recently used dropped first."""

    def __init__(self, block: int = 16, max_tokens: int = 4096) -> None:
        self.block, self.max_tokens = block, max_tokens
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()  # (parent id, tokens) -> block, oldest use first
        self._by_id: dict[int, _Block] = {}
        self.hits = 0
        """Prompt tokens served from the cache so far (not run through the model)."""

    @property
    def tokens(self) -> int:
        """Tokens whose keys and values are kept now."""
        return len(self._blocks) * self.block

    def lookup(self, prompt: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Keys and values (one (1, K, n, D) tensor per layer each) of the longest known prefix of `prompt` in whole
        blocks, leaving at least its last token to run (whose logits the first new token needs); None if none."""
        found, parent = [], 0
        for start in range(0, len(prompt) - self.block, self.block):  # at most (len - 1) // block blocks
            key = (parent, tuple(prompt[start:start + self.block]))
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
            parent = block.id
        if not found:
            return None
        self.hits += len(found) * self.block
        layers = range(len(found[0].k))
        return ([torch.cat([b.k[i] for b in found], dim=2) for i in layers],
                [torch.cat([b.v[i] for b in found], dim=2) for i in layers])

    def store(self, prompt: list[int], cache: KVCache) -> None:
        """Keep the whole blocks of `prompt` that a one-row cache holds keys and values for (from its first
        position after any left padding), those known already only marked as used."""
        if self.max_tokens < self.block:
            return
        parent, pad = 0, int(cache.pad[0]) if cache.pad is not None else 0
        for start in range(0, cache.pos - pad - self.block + 1, self.block):
            key = (parent, tuple(prompt[start:start + self.block]))
            block = self._blocks.get(key)
            if block is None:
                first, end = pad + start, pad + start + self.block
                block = _Block(key, [k[:, :, first:end].clone() for k in cache.k],
                               [v[:, :, first:end].clone() for v in cache.v])
                self._blocks[key] = self._by_id[block.id] = block
                if parent:
                    self._by_id[parent].children += 1
            self._blocks.move_to_end(key)
            parent = block.id
        self._evict()

    def _evict(self) -> None:
        """Drop least recently used leaves (blocks no other extends) until max_tokens are kept at most."""
        while self.tokens > self.max_tokens:
            key, block = next(((k, b) for k, b in self._blocks.items() if not b.children), (None, None))
            if block is None:
                return
            del self._blocks[key], self._by_id[block.id]
            if key[0]:
                self._by_id[key[0]].children -= 1


__all__ = ["PrefixCache"]
