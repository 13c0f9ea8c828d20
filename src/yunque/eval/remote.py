"""Evaluate a model behind an OpenAI-compatible server, as lm-evaluation-harness's local-completions does.

Log-likelihoods: POST {base_url}/v1/completions with the context and continuation as one prompt, echo=true,
logprobs=1, max_tokens=1, temperature=0; the continuation's tokens are those the server's tokenizer starts at or
after the context's end (text_offset), their log-probabilities summed (the one generated token dropped, as lm-eval
drops it), greedy when each equals the best of its top_logprobs. Generation: the context as prompt, temperature 0,
the task's stop strings. The server tokenizes; yunque needs no tokenizer of its own for it.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Sequence


class RemoteLM:
    """A model served at `base_url` (e.g. http://127.0.0.1:8000) under the name `model`."""

    def __init__(self, base_url: str, model: str, *, batch_size: int = 16, timeout: float = 600.0) -> None:
        self.url = base_url.rstrip("/")
        if not self.url.endswith("/v1/completions"):
            self.url += "/completions" if self.url.endswith("/v1") else "/v1/completions"
        self.name, self.batch_size, self.timeout = model, batch_size, timeout
        # the server's weights are out of sight: results are cached under its address and model name
        self.fingerprint = "remote-" + hashlib.sha256(f"{self.url} {model}".encode()).hexdigest()[:16]

    def _post(self, payload: dict) -> dict:
        body = json.dumps({"model": self.name, **payload}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:200]
            raise ValueError(f"{self.url} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError) as e:
            raise ValueError(f"cannot reach {self.url} ({getattr(e, 'reason', e)}); is the server running? "
                             f"check --base-url") from None

    def loglikelihood(self, pairs, progress=None):
        out: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            for ctx, _ in chunk:
                if not isinstance(ctx, str):
                    raise ValueError("--chat with --base-url is not supported: /v1/completions takes text; "
                                     "evaluate the model dir locally with --chat")
            reply = self._post({"prompt": [c + t for c, t in chunk], "max_tokens": 1, "temperature": 0,
                                "logprobs": 1, "echo": True, "seed": 1234})
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            for (ctx, _), choice in zip(chunk, choices):
                out.append(_continuation_logprob(choice["logprobs"], len(ctx.rstrip(" "))))
            if progress:
                progress(len(chunk))
        return out

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Each text's summed log-likelihood from one echoed request (the server's own context window: a text
        longer than it is the server's to refuse); its first token has no log-probability and is not counted."""
        out = []
        for text in texts:
            lp = self._post({"prompt": text, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True,
                             "seed": 1234})["choices"][0]["logprobs"]
            out.append(sum(x for x in lp["token_logprobs"][:-1] if x is not None))
        return out

    def generate(self, contexts, until, max_gen_toks):
        out = []
        for ctx in contexts:
            if not isinstance(ctx, str):
                raise ValueError("--chat with --base-url is not supported; evaluate the model dir locally with --chat")
            text = self._post({"prompt": ctx, "max_tokens": max_gen_toks, "temperature": 0,
                               "stop": list(until)[:4], "seed": 1234})["choices"][0]["text"]
            for s in until:  # servers take at most 4 stop strings; the rest are cut here
                text = text.split(s)[0]
            out.append(text)
        return out


def _continuation_logprob(lp: dict, context_chars: int) -> tuple[float, bool]:
    """(summed log-probability, greedy) of the echoed tokens that start at or after `context_chars`, without the
    generated last token."""
    offsets, logprobs, tops = lp["text_offset"], lp["token_logprobs"], lp.get("top_logprobs")
    start = next((i for i, o in enumerate(offsets) if o >= context_chars), len(offsets) - 1)
    start = max(start, 1)  # the first token has no log-probability
    ll, greedy = 0.0, True
    for i in range(start, len(offsets) - 1):
        ll += logprobs[i]
        if tops and tops[i] and logprobs[i] < max(tops[i].values()):
            greedy = False
    return ll, greedy


__all__ = ["RemoteLM"]
