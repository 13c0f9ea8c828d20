"""The OpenAI-completions client against a tiny fake server (in a thread) that answers from a yunque model: its
scores equal the local ones."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F

from yunque.config import preset
from yunque.eval.harness import evaluate
from yunque.eval.lm import LocalLM
from yunque.eval.remote import RemoteLM
from yunque.eval.task import load_task
from yunque.model.gpt import GPT
from yunque.tokenizer.bpe import byte_tokenizer


def fake_server(model, tok):
    """/v1/completions as an OpenAI-compatible server answers echo + logprobs (one byte a token, so text_offset is
    the byte offset; the start token has none), and greedy generation."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if self.path != "/v1/completions":
                self.send_error(404)
                return
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            choices = []
            for i, text in enumerate(prompts):
                ids = tok.encode(text, bos=True)
                with torch.no_grad():
                    logp = F.log_softmax(model(torch.tensor([ids]))[0], -1)  # (T, V)
                if body.get("echo"):
                    nxt = int(logp[-1].argmax())
                    lps = [None] + [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))] + [float(logp[-1, nxt])]
                    tops = [None] + [{str(int(logp[j - 1].argmax())): float(logp[j - 1].max())}
                                     for j in range(1, len(ids) + 1)]
                    offsets = [0] + list(range(len(ids) - 1)) + [len(text)]
                    choices.append({"index": i, "text": text + chr(nxt), "logprobs": {
                        "tokens": [str(t) for t in ids + [nxt]], "token_logprobs": lps, "top_logprobs": tops,
                        "text_offset": offsets}})
                else:
                    out = []
                    for _ in range(body["max_tokens"]):
                        with torch.no_grad():
                            out.append(int(model(torch.tensor([ids + out]))[0, -1].argmax()))
                    choices.append({"index": i, "text": tok.decode(out), "finish_reason": "length"})
            data = json.dumps({"choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.fixture(scope="module")
def served():
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=1024)).eval()
    server, seen = fake_server(model, tok)
    yield LocalLM(model, tok, name="tiny"), f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_remote_scores_equal_local_ones(served, shared_data):
    local, url, seen = served
    remote = RemoteLM(url, "tiny", batch_size=3)
    task = load_task("arc_easy", shared_data)
    ours = evaluate(task, local, limit=3, num_fewshot=1)
    theirs = evaluate(task, remote, limit=3, num_fewshot=1)
    for a, b in zip(ours["items"], theirs["items"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
    assert ours["metrics"] == theirs["metrics"]
    body = seen[0]
    assert body["echo"] is True and body["logprobs"] == 1 and body["max_tokens"] == 1 and body["model"] == "tiny"
    assert len(body["prompt"]) == 3  # batched, as lm-eval's local-completions sends them
    pairs = [("Q: 2+2?\nA:", " 4"), ("abc", "def")]
    for (ll, greedy), (ll2, greedy2) in zip(remote.loglikelihood(pairs), local.loglikelihood(pairs)):
        assert ll == pytest.approx(ll2, abs=1e-4) and greedy == greedy2


def test_remote_generation_and_errors(served):
    local, url, _ = served
    remote = RemoteLM(url + "/v1", "tiny")
    assert remote.generate(["Hello"], ["\n\n"], 5) == local.generate(["Hello"], ["\n\n"], 5)
    with pytest.raises(ValueError, match="cannot reach http://127.0.0.1:9/v1/completions"):
        RemoteLM("http://127.0.0.1:9", "tiny", timeout=2).loglikelihood([("a", "b")])
    with pytest.raises(ValueError, match="--chat with --base-url is not supported"):
        remote.loglikelihood([([{"role": "user", "content": "hi"}], "x")])
