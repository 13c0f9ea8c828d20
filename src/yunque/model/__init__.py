from yunque.model.gpt import GPT
from yunque.model.kv_cache import KVCache

__all__ = ["GPT", "KVCache"]
