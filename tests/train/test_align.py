"""Alignment: DPO against a cached reference, GRPO and PPO rollouts through the engine, their twin tests (rollouts
equal the policy's own sampling; the first minibatch has ratio 1 and KL 0), exact resume in mid-rollout."""

import dataclasses
import json
import math
import sys

import pytest
import safetensors.torch
import torch

from yunque.config import AlignConfig, LoopConfig, LoraConfig
from yunque.engine.engine import Engine
from yunque.engine.sampling import sample
from yunque.losses import IGNORE, kl_penalty, ppo_policy_loss, target_logprobs, token_kl
from yunque.model.heads import HEADS
from yunque.modeldir import WEIGHTS, load_model
from yunque.tokenizer.chat import ChatFormat
from yunque.train.align import ROLLOUTS_LOG, main, prepare, rollout_seed, sample_replies
from yunque.train.checkpoint import TRAINABLE

WORDS = ["sol", "mar", "luz", "pan", "té", "río", "flor", "nube", "roca", "hoja", "lago", "miel"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A preference a random model does not have: a reply ending in "!" over the same reply ending in "?"."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": f"di {w}", "chosen": f"{w}!", "rejected": f"{w}?"} for w in WORDS * 2]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def rewards(tmp_path_factory, monkeypatch_module):
    """A module of reward functions in a dir that becomes the working directory."""
    d = tmp_path_factory.mktemp("cwd")
    (d / "align_rewards.py").write_text(
        "import os, signal\n"
        "CALLS, STOP_AT = [0], [0]\n"
        "def a_share(prompt, completion):\n"
        "    CALLS[0] += 1\n"
        "    if CALLS[0] == STOP_AT[0]:  # Ctrl-C in the middle of a rollout\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return completion.count('a') / max(len(completion), 1)\n", encoding="utf-8")
    monkeypatch_module.chdir(d)
    return d


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def loop(out, steps, **kw):
    return LoopConfig(out_dir=str(out), max_steps=steps, lr=kw.pop("lr", 3e-3), warmup_steps=1, weight_decay=0.0,
                      precision="fp32", eval_every=0, progress=False, compile="off", **kw)


def test_dpo_learns_the_preference_against_a_reference_computed_once(base, pairs, tmp_path):
    out = tmp_path / "dpo"
    cfg = AlignConfig(model=str(base), data=(str(pairs),), out=str(out), batch_size=4, val_fraction=0.25,
                      loop=loop(out, 30))
    s = main(cfg)
    assert s["before"]["reward_accuracy"] == 0.5 and s["before"]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert s["after"]["reward_accuracy"] == 1.0 and s["after"]["loss"] < 0.4, s["after"]
    assert s["val_loss"] < s["val_loss_before"]
    model, _ = load_model(out)  # a complete model dir
    assert json.loads((out / "run.json").read_text())["stage"] == "align"

    # the batches carry the reference's log-probabilities, computed once from the model as it was
    out2 = tmp_path / "dpo2"
    run = prepare(AlignConfig(model=str(base), data=(str(pairs),), out=str(out2), batch_size=4, val_fraction=0.25),
                  loop(out2, 1))
    x, y, ref = run.batches(3)
    with torch.no_grad():
        run.model.eval()
        first = run.model(x)
        for p in run.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert torch.equal(run.batches(3)[2], ref)  # unchanged by the policy's change
    logps = target_logprobs(first, y).sum(1)
    torch.testing.assert_close(torch.stack(logps.chunk(2), dim=1), ref)



def test_the_reference_is_computed_in_the_runs_precision_so_dpo_starts_at_zero(base, pairs, tmp_path):
    out = tmp_path / "dpo-bf16"  # in bf16 a reference computed in fp32 would differ from the policy at step 0
    s = main(AlignConfig(model=str(base), data=(str(pairs),), out=str(out), batch_size=4, val_fraction=0.25,
                         loop=dataclasses.replace(loop(out, 1), precision="bf16")))
    assert s["before"]["reward_accuracy"] == 0.5 and s["before"]["reward_margin"] == 0.0
    assert s["before"]["loss"] == pytest.approx(math.log(2), abs=1e-6)

@pytest.fixture(scope="module")
def ordinary(tmp_path_factory):
    """Ordinary text, nothing like the pairs: what the anchor holds the model to."""
    path = tmp_path_factory.mktemp("anchor") / "text.txt"
    path.write_text(" ".join(f"{a} {b} de la {c}." for a, b, c in zip(WORDS * 8, WORDS[3:] * 9, WORDS[5:] * 9)))
    return path


def anchor_kl(model, reference, windows) -> float:
    with torch.no_grad():
        return float(token_kl(reference(windows), model(windows)).mean())


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_the_anchor_holds_the_model_to_the_reference_on_ordinary_text(base, pairs, rewards, ordinary, tmp_path,
                                                                        method):
    settings = dict(method="grpo", reward_fn="align_rewards:a_share", group_size=8, prompts_per_rollout=2,
                    max_new_tokens=8, kl_coef=0.0) if method == "grpo" else dict(batch_size=4)
    steps, lr = (12, 5e-2) if method == "grpo" else (20, 1e-2)
    reference, tok = load_model(base)
    windows = torch.tensor(tok.encode(ordinary.read_text())[:4 * 33]).view(4, 33)[:, :32]
    drift = {}
    for coef in (0.0, 3.0):
        out = tmp_path / f"{method}-{coef}"
        cfg = AlignConfig(model=str(base), data=(str(pairs),), out=str(out), anchor_text=(str(ordinary),),
                          anchor_coef=coef, val_fraction=0.25, loop=loop(out, steps, lr=lr), **settings)
        if coef:  # at the start the policy is the reference: the anchor adds nothing to the loss
            probe, bare_dir = tmp_path / f"{method}-probe", tmp_path / f"{method}-bare"
            run = prepare(dataclasses.replace(cfg, out=str(probe)), loop(probe, 1))
            inner, x = run.batches(0)
            assert x.shape == (cfg.anchor_batch_size, min(128, reference.cfg.max_seq_len))
            bare = prepare(dataclasses.replace(cfg, anchor_text=(), out=str(bare_dir)), loop(bare_dir, 1))
            torch.testing.assert_close(run.loss(run.model, (inner, x)), bare.loss(bare.model, bare.batches(0)))
        main(cfg)
        drift[coef] = anchor_kl(load_model(out)[0], reference, windows)
    assert drift[3.0] < 0.5 * drift[0.0], drift


def test_dpo_with_lora_writes_an_adapter_and_ipo_trains(base, pairs, tmp_path):
    out = tmp_path / "lora"
    s = main(AlignConfig(model=str(base), data=(str(pairs),), out=str(out), batch_size=4, val_fraction=0.25,
                         lora=LoraConfig(rank=4, alpha=8), loss="ipo", loop=loop(out, 15, lr=1e-2)))
    assert s["lora_layers"] > 0 and s["trainable_parameters"] < s["parameters"] / 2
    assert s["after"]["reward_accuracy"] == 1.0
    files = {p.name for p in out.iterdir()}
    assert {TRAINABLE, "adapter_config.json", "tokenizer.json"} <= files and WEIGHTS not in files


def test_rollouts_from_the_engine_equal_the_policys_own_sampling(base):
    model, tok = load_model(base)
    fmt = ChatFormat.of(base, tok)
    engine = Engine(model, tok, precision="fp32")
    engine.stop_ids |= fmt.stop_ids
    prompts = [fmt.prompt([{"role": "user", "content": t}]) for t in ("hola", "¿qué tal estás hoy?", "x")]
    from yunque.config import SamplingParams

    params = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=rollout_seed(0, 5, j)) for j in range(3)]
    replies = sample_replies(engine, fmt, prompts, params)
    for prompt, p, (ids, _, ended) in zip(prompts, params, replies):
        g = torch.Generator().manual_seed(p.seed)
        seq, own = list(prompt), []
        with torch.no_grad():
            for _ in range(p.max_new_tokens):  # the policy alone, recomputing the whole sequence each token
                token = int(sample(model(torch.tensor([seq]))[:, -1], temperature=1.0, generators=[g])[0])
                text = tok.token_bytes(token).decode(errors="replace")
                if token in engine.stop_ids or text in fmt.stop:  # an end of turn, or a role token, ends the reply
                    break
                own.append(token)
                seq.append(token)
        assert ids == own and ended == (len(own) < p.max_new_tokens)
    assert any(len(ids) > 3 for ids, _, _ in replies)


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_the_first_minibatch_has_ratio_one_and_no_kl(base, pairs, rewards, tmp_path, method):
    out = tmp_path / method
    out.mkdir()
    cfg = AlignConfig(model=str(base), data=(str(pairs),), out=str(out), method=method,
                      reward_fn="align_rewards:a_share", group_size=4, prompts_per_rollout=2, minibatches=2,
                      max_new_tokens=10)
    run = prepare(cfg, loop(out, 4))
    b = run.batches(0)
    mask = b["y"] != IGNORE
    with torch.no_grad():
        logits = run.model(b["x"])[0] if method == "ppo" else run.model(b["x"])
    logps = target_logprobs(logits, b["y"])
    _, ratio = ppo_policy_loss(logps, b["old_logps"], b["advantages"] if method == "ppo" else
                               b["advantages"].unsqueeze(1) * mask, mask)
    assert ratio[mask].tolist() == pytest.approx([1.0] * int(mask.sum()), abs=1e-5)
    assert kl_penalty(logps, b["ref_logps"], "k3")[mask].abs().max() < 1e-5
    assert mask.sum(1).min() >= 1 and b["x"].shape[0] == 4  # half of the 8 replies
    if method == "grpo":  # advantages are relative to each prompt's group of 4
        adv = run.batches(1)["advantages"]
        assert adv.shape == (4,)


def test_grpo_raises_the_reward_and_logs_rollouts(base, pairs, rewards, tmp_path):
    out = tmp_path / "grpo"
    s = main(AlignConfig(model=str(base), data=(str(pairs),), out=str(out), method="grpo",
                         reward_fn="align_rewards:a_share", group_size=8, prompts_per_rollout=2, max_new_tokens=8,
                         kl_coef=0.0, loop=loop(out, 12, lr=5e-2)))
    log = [json.loads(line) for line in (out / ROLLOUTS_LOG).read_text().splitlines()]
    assert [r["rollout"] for r in log] == list(range(12))
    first, last = sum(r["reward"] for r in log[:3]) / 3, sum(r["reward"] for r in log[-3:]) / 3
    assert last > first + 0.1, log
    assert s["after"]["kl"] > 0 and s["before"]["kl"] == pytest.approx(0, abs=1e-5)
    assert s["undertrained"] is None  # a surrogate loss that did not fall says nothing of what the policy learned


def test_ppo_resumes_exactly_in_the_middle_of_a_rollout(base, pairs, rewards, tmp_path):
    def ppo(out, steps, resume=False):
        return main(AlignConfig(model=str(base), data=(str(pairs),), out=str(out), method="ppo",
                                reward_fn="align_rewards:a_share", group_size=2, prompts_per_rollout=2,
                                minibatches=2, epochs=2, max_new_tokens=8, kl_target=0.5, val_fraction=0.1,
                                loop=loop(out, steps, lr=1e-2, resume=resume, checkpoint_every=1)))

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    ppo(whole, 6)
    calls, stop_at = sys.modules["align_rewards"].CALLS, sys.modules["align_rewards"].STOP_AT  # as --reward-fn has it
    calls[0], stop_at[0] = 0, 2 + 4 + 1  # 2 held-out replies scored before training, 4 in rollout 0, then rollout 1
    with pytest.raises(KeyboardInterrupt, match="checkpoint at step 5"):  # the step of rollout 1's first minibatch
        ppo(parts, 6)
    stop_at[0] = 0
    ppo(parts, 6, resume=True)  # from step 5: the second minibatch of rollout 1, read back from rollout.pt
    for name in (WEIGHTS, HEADS):
        a, b = safetensors.torch.load_file(str(whole / name)), safetensors.torch.load_file(str(parts / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    log = [json.loads(line) for line in (whole / ROLLOUTS_LOG).read_text().splitlines()]
    assert len(log) == 2 and log[1]["kl_coef"] != log[0]["kl_coef"]  # adaptive: the coefficient moved
