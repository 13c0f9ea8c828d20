"""Scalar heads: the reward is read at the scored token, and only that token's hidden state sends it gradient."""

import torch

from yunque.config import preset
from yunque.model.gpt import GPT
from yunque.model.heads import WithHeads, forward_with_hidden, last_positions
from yunque.train.scoring import reward_scores


def test_the_reward_head_learns_only_from_the_scored_tokens():
    torch.manual_seed(0)
    rm = WithHeads(GPT(preset("tiny", vocab_size=64, max_seq_len=32)), ("reward",))
    ids = torch.randint(10, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[1, 6:] = 3  # padding after row 1's reply ends at position 5; token 3 appears nowhere else
    last = torch.tensor([11, 5])
    rewards = reward_scores(rm, ids, last)
    rewards.sum().backward()

    with torch.no_grad():
        _, hidden = forward_with_hidden(rm.model, ids)
    head = rm.heads["reward"]
    scored = hidden[torch.arange(2), last]  # (2, C): the hidden states the rewards were read from
    torch.testing.assert_close(head.weight.grad, scored.sum(0, keepdim=True))  # d(w.h + b)/dw = h, summed
    torch.testing.assert_close(rewards.detach(), (scored @ head.weight.T + head.bias).squeeze(1))
    # the padding sends nothing back: its token's embedding gets no gradient, and other padding scores the same
    assert not rm.model.tok_emb.weight.grad[3].any()
    assert rm.model.tok_emb.weight.grad[ids[0]].abs().sum() > 0
    other = ids.clone()
    other[1, 6:] = 9
    torch.testing.assert_close(reward_scores(rm, other, last).detach(), rewards.detach())


def test_last_positions():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert last_positions(mask).tolist() == [2, 3, 0]
