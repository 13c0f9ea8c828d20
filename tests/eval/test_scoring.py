"""Log-likelihood scoring: the batched shared-prefix path equals one request at a time; lm-eval's pair encoding
and rolling windows."""

import random

import pytest
import torch
import torch.nn.functional as F

from yunque.config import preset
from yunque.eval.scoring import encode_pair, rolling_requests, score_batched, score_one
from yunque.model.gpt import GPT
from yunque.tokenizer.bpe import byte_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=300, max_seq_len=48)).eval()


GPT2_STYLE = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True)
GQA = dict(n_head=4, n_kv_head=2, qk_norm=True)


@pytest.mark.parametrize("family", [{}, GPT2_STYLE, GQA], ids=["llama", "gpt2", "gqa-qknorm"])
def test_batched_scores_equal_one_at_a_time_in_every_family(family):
    torch.manual_seed(0)
    test_batched_scores_equal_one_at_a_time(GPT(preset("tiny", vocab_size=300, max_seq_len=48, **family)).eval())


def test_batched_scores_equal_one_at_a_time(model):
    rnd = random.Random(0)
    requests = []
    for _ in range(9):  # questions: one context, several continuations of different lengths
        ctx = [rnd.randrange(300) for _ in range(rnd.randint(1, 30))]
        requests += [(ctx, [rnd.randrange(300) for _ in range(rnd.randint(1, 12))]) for _ in range(rnd.randint(1, 4))]
    requests.append(([5] * 45, [7] * 10))  # longer than the window: cut on the left, scored alone
    requests.append(([3], [4]))  # one-token context and continuation
    rnd.shuffle(requests)
    done = []
    for batch_size in (1, 5, 64):
        fast = score_batched(model, requests, batch_size=batch_size, progress=done.append)
        for r, (ll, greedy) in zip(requests, fast):
            ll1, greedy1 = score_one(model, r)
            assert ll == pytest.approx(ll1, abs=1e-5)
            assert greedy == greedy1
    assert sum(done) == 3 * (len(requests) - 1)  # the overlong request is not a batch's


def test_each_context_and_continuation_token_runs_once(model):
    """The packed path's arithmetic is that of the distinct tokens: each context once, each continuation's tokens
    but its last once; here no row is padded (the groups have the same lengths), so nothing else runs."""
    requests = [([1, 2, 3, 4, 5], [6, 7, 8]), ([1, 2, 3, 4, 5], [9, 10]), ([1, 2, 3, 4, 5], [11]),
                ([20, 21, 22, 23, 24], [25, 26]), ([20, 21, 22, 23, 24], [27, 28, 29]), ([20, 21, 22, 23, 24], [30])]
    fed = []
    hook = model.tok_emb.register_forward_hook(lambda m, args, out: fed.append(args[0].numel()))
    try:
        fast = score_batched(model, requests, batch_size=6)
    finally:
        hook.remove()
    assert sum(fed) == 2 * 5 + sum(len(c) - 1 for _, c in requests) and len(fed) == 2  # one batch: two forwards
    assert [ll for ll, _ in fast] == pytest.approx([score_one(model, r)[0] for r in requests], abs=1e-5)


def test_long_continuations_of_one_context_take_rows_of_their_own(monkeypatch):
    """Rolling windows share their one-token context: packed together, their row's attention would grow with the
    square of the document; past PACKED_TOKENS they run in rows of their own, the context again in each."""
    import yunque.eval.scoring as scoring

    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=300, max_seq_len=48)).eval()
    monkeypatch.setattr(scoring, "PACKED_TOKENS", 40)
    requests = [([0], list(range(10 * k + 1, 10 * k + 21))) for k in range(5)]  # 19 tokens fed each: 2 a row
    widths = []
    hook = model.tok_emb.register_forward_hook(lambda m, args, out: widths.append(args[0].shape))
    try:
        fast = score_batched(model, requests, batch_size=64)
    finally:
        hook.remove()
    assert widths == [(3, 1), (3, 38)]  # three rows (2 + 2 + 1 windows), each context once per row
    assert [ll for ll, _ in fast] == pytest.approx([score_one(model, r)[0] for r in requests], rel=1e-6)


def test_score_one_is_the_sum_of_token_logprobs(model):
    ids = [1, 2, 3, 4, 5, 6]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    want = sum(float(logp[i - 1, ids[i]]) for i in range(3, 6))
    ll, greedy = score_one(model, (ids[:3], ids[3:]))
    assert ll == pytest.approx(want, abs=1e-6)
    assert greedy == all(int(logp[i - 1].argmax()) == ids[i] for i in range(3, 6))


def test_greedy_continuation_is_greedy(model):
    ctx = [10, 20, 30]
    cont = []
    for _ in range(4):
        with torch.no_grad():
            cont.append(int(model(torch.tensor([ctx + cont]))[0, -1].argmax()))
    assert score_batched(model, [(ctx, cont)])[0][1] is True
    cont[-1] = (cont[-1] + 1) % 300
    assert score_batched(model, [(ctx, cont)])[0][1] is False


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole():
    tok = byte_tokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "Paris")
    assert ctx == tok.encode("Answer:", bos=True) and cont == tok.encode(" Paris")
    ctx, cont = encode_pair(tok, "", "Paris")  # empty context: the start token
    assert ctx == [tok.bos_id] and cont == tok.encode("Paris")


def test_rolling_windows_predict_every_token_once():
    tokens = list(range(100, 137))
    windows = rolling_requests(tokens, 0, 8)
    predicted = [t for _, cont in windows for t in cont]
    assert predicted == tokens
    assert all(len(ctx) + len(cont) - 1 <= 8 for ctx, cont in windows)
    assert windows[0][0] == [0]
    utils = pytest.importorskip("lm_eval.utils")
    theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(tokens, 0, 8, 1)]
    assert windows == [tuple(map(list, w)) for w in theirs]


def test_rolling_sum_is_the_whole_text_loglikelihood_when_it_fits(model):
    tokens = [11, 12, 13, 14, 15]
    total = sum(ll for ll, _ in score_batched(model, rolling_requests(tokens, 0, 48)))
    assert total == pytest.approx(score_one(model, ([0], tokens))[0], abs=1e-5)
