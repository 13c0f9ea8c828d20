"""Alignment with preferences: DPO (or IPO) on preference pairs, GRPO and PPO on prompts against a reward.

    dpo    pairs -> PairBatches; the frozen reference's log-probabilities of every pair computed once, in prepare,
           and kept; loss = dpo_loss(policy, reference) (losses.py)
    grpo   prompts -> rollouts through the engine (k samples a prompt, the engine's weights refreshed from the
           policy first) -> rewards -> advantages relative to each group -> the clipped objective with a per-token
           KL penalty to the reference (Shao et al. 2024)
    ppo    the same rollouts, k samples a prompt (1: plain PPO), a value head on the policy (WithHeads), per-token
           rewards (the KL penalty on every token, the reward on the last), GAE, the clipped objective and the
           clipped value loss (Schulman et al. 2017; Ouyang et al. 2022); the KL coefficient fixed or adaptive

With --anchor-text, every method's loss gains the KL from the reference to the policy on windows of ordinary
text: the model's language outside the chat is held where it was while its replies change (the reference's
next-token distributions distilled, in the spirit of InstructGPT's pretraining mix, Ouyang et al. 2022, without
pulling the model toward that text beyond where the reference stood).

All on the stage skeleton (train/run.py) and the one loop: micro-batch i of a rollout method is a minibatch of
rollout i // (epochs * minibatches), sampled when its first minibatch is asked for (the loop asks in order) from
the policy as it is then. Each rollout is saved in the run dir (rollout.pt) when it is made, so a run resumed in
the middle of one trains on the same replies. The out dir is a model dir (or an adapter dir with --lora) at every
checkpoint; PPO's value head is beside it in heads.safetensors.

Under torchrun (DDP or FSDP) batches are global and each process trains on its rows: DPO's B pairs a process
(every process holds the reference's log-probabilities of all pairs), and GRPO/PPO rollouts whose prompts each
process samples and scores for itself before they are gathered (see `Rollouts`). PPO's value head is part of the
wrapped model, so its gradients are reduced with the policy's.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yunque.atomic import atomic_write
from yunque.config import AlignConfig, LoopConfig, SamplingParams, align_loop
from yunque.data.loaders import TokenWindows
from yunque.data.preferences import PairBatches, fingerprint, load_prompts, pair_batches, split
from yunque.data.sources import fingerprint as text_fingerprint
from yunque.data.sources import iter_documents
from yunque.engine.engine import Engine
from yunque.losses import (
    IGNORE,
    dpo_loss,
    gae,
    group_advantages,
    implicit_rewards,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    sequence_logprobs,
    target_logprobs,
    token_kl,
    value_loss,
)
from yunque.model.heads import WithHeads
from yunque.model.lora import attach_lora
from yunque.modeldir import load_model
from yunque.precision import autocast, resolve_precision
from yunque.tokenizer.bpe import END_OF_TURN
from yunque.tokenizer.chat import ChatFormat
from yunque.train.run import Prepared, run_stage, start_model_dir
from yunque.train.runtime import Runtime
from yunque.train.scoring import call_reward_fn, import_reward_fn, load_reward_model

ROLLOUT = "rollout.pt"
"""The current rollout of a GRPO/PPO run (its replies, old and reference log-probabilities, rewards)."""
ROLLOUTS_LOG = "rollouts.jsonl"
"""One line per rollout: mean reward, KL to the reference per reply, reply length, KL coefficient."""
EVAL_PROMPTS = 32
"""Held-out prompts answered (greedily) at each evaluation of a GRPO/PPO run."""
ANCHOR_WINDOW = 128
"""Tokens in a window of anchor text (fewer if the run's context is shorter)."""
ANCHOR_TOKENS = 1_000_000
"""Anchor text read at most, in tokens: windows for thousands of steps without tokenizing a whole corpus."""


def main(cfg: AlignConfig, runtime: Runtime | None = None) -> dict[str, Any]:
    """Run alignment (in one process, or in each of torchrun's with `runtime`); return the loop's summary with the
    stage's held-out figures before and after."""
    if cfg.loop is None:
        cfg = dataclasses.replace(cfg, loop=align_loop(cfg.method, cfg.lora is not None))
    if cfg.reward_fn and not cfg.loop.resume:
        import_reward_fn(cfg.reward_fn)  # one line, before anything is written
    figures: list[dict[str, float]] = []
    ran: list[AlignConfig] = []  # the run's own config: on --resume, the one in its run.json

    def prepare_run(c: AlignConfig, loop: LoopConfig) -> Prepared:
        ran.append(c)
        return prepare(c, loop, figures, runtime)

    inputs = lambda c: [c.model, *c.data, *c.anchor_text, *([c.reward] if c.reward else [])]  # noqa: E731
    summary = run_stage("align", cfg, prepare_run, inputs=inputs, runtime=runtime)
    fresh = summary["val_loss_before"] is not None
    return {**summary, "method": (ran[-1] if ran else cfg).method,
            "before": figures[0] if fresh and figures else None, "after": figures[-1] if figures else None}


def prepare(cfg: AlignConfig, loop: LoopConfig, figures: list[dict[str, float]] | None = None,
            runtime: Runtime | None = None) -> Prepared:
    """The policy (adapters attached), its batches, loss and held-out evaluation for cfg.method; on a fresh run
    also writes the out dir's tokenizer, chat files and config (or adapter config). Each held-out evaluation (the
    skeleton's before training, the loop's) appends the method's figures to `figures`: DPO's loss and
    implicit-reward accuracy, GRPO/PPO's reward and KL to the reference. Under torchrun (`runtime`) every process
    prepares alike; batches are global and each process trains on its rows of them (see the module doc)."""
    model, tokenizer = load_model(cfg.model, device=loop.device)
    fmt = ChatFormat.of(cfg.model, tokenizer)
    if not fmt.is_chat:
        raise ValueError(f"{cfg.model}: the model has no chat format; align a chat model (`yunque sft` makes one)")
    seq_len = cfg.max_seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"max_seq_len={seq_len} is longer than the model's context ({model.cfg.max_seq_len}); "
                         f"pass --max-seq-len {model.cfg.max_seq_len} or less")
    model.float().eval()  # fp32 master weights; the reference is this model as loaded
    figures = figures if figures is not None else []
    runtime = runtime or Runtime()
    # DPO keeps the reference's log-probabilities of its pairs, not the reference, unless the anchor needs it
    reference = copy.deepcopy(model).requires_grad_(False) if cfg.method != "dpo" or cfg.anchor_text else None
    if cfg.method == "dpo":
        run = _prepare_dpo(cfg, loop, model, fmt, seq_len, figures, runtime)
    else:
        run = _prepare_rl(cfg, loop, model, reference, fmt, seq_len, figures, runtime)
    if cfg.anchor_text:
        window = min(ANCHOR_WINDOW, seq_len)
        run = anchored(run, cfg, loop, reference, anchor_windows(cfg.anchor_text, tokenizer, window), window)
    if not loop.resume:
        start_model_dir(Path(cfg.out), cfg.model, tokenizer, model.cfg, cfg.lora)
    return run


def _attach(cfg: AlignConfig, model: torch.nn.Module) -> list[str]:
    """LoRA adapters if asked for; what is made new from here on (adapters, PPO's value head) is seeded."""
    torch.manual_seed(cfg.seed)
    layers = []
    if cfg.lora is not None:
        layers = attach_lora(model, cfg.lora)
    model.train()
    return layers


def _info(model: torch.nn.Module, layers: list[str], fmt: ChatFormat, **more: Any) -> dict[str, Any]:
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "lora_layers": len(layers), "chat_format": fmt.kind, **more}


# ---- DPO ----

def _prepare_dpo(cfg: AlignConfig, loop: LoopConfig, model, fmt: ChatFormat, seq_len: int,
                 figures: list[dict[str, float]], runtime: Runtime) -> Prepared:
    pairs, train, val = pair_batches(cfg.data, fmt, max_seq_len=seq_len, val_fraction=cfg.val_fraction,
                                     seed=cfg.seed)
    mean = cfg.loss == "ipo"  # IPO compares per-token mean log-probabilities
    B, W, device = cfg.batch_size, loop.world_size, loop.device
    # the reference is the model before training: its log-probabilities once, for every pair, then never again
    # (under torchrun every process computes all of them alike, so any process can train on any pair), in the
    # run's precision, as the policy's are, so that the implicit rewards start at exactly 0
    with autocast(resolve_precision(loop.precision, device), device):
        ref_train = pair_logprobs(model, train, B, device, mean=mean)
        ref_val = pair_logprobs(model, val, B, device, mean=mean) if val else None
    layers = _attach(cfg, model)

    def batches(i: int):  # the global micro-batch of B x W pairs, process r's B pairs its r-th rows (runtime.shard)
        index = train.indices(B * W, seed=cfg.seed, step=i)
        x, y = train.collate(index, groups=W)
        return x.to(device), y.to(device), ref_train[index].to(device)

    def loss(m: torch.nn.Module, batch) -> torch.Tensor:
        x, y, ref = batch
        logps = sequence_logprobs(m(x), y, mean=mean)  # (2B,): chosen rows, then rejected
        return dpo_loss(torch.stack(logps.chunk(2), dim=1), ref, beta=cfg.beta, kind=cfg.loss)

    def evaluate(m: torch.nn.Module) -> float:  # every process: the same global batches, whatever their number
        figures.append(dpo_figures(m, val, ref_val, dataclasses.replace(cfg, batch_size=B * W), device))
        return figures[-1]["loss"]

    info = _info(model, layers, fmt, pairs={"train": len(train), "val": len(val) if val else 0})
    return Prepared(model, batches, loss, evaluate if val else None,
                    tokens_per_step=round(B * W * loop.grad_accum * train.mean_len),
                    trainable_only=cfg.lora is not None, fingerprint=fingerprint(pairs), info=info)


@torch.no_grad()
def pair_logprobs(model: torch.nn.Module, pairs: PairBatches, batch_size: int, device: str, *,
                  mean: bool = False, limit: int | None = None) -> torch.Tensor:
    """Log-probabilities (N, 2) of the [chosen, rejected] replies of the first `limit` pairs (all by default)
    under `model` (in eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    n = len(pairs) if limit is None else min(limit, len(pairs))
    for start in range(0, n, batch_size):
        x, y = pairs.collate(range(start, min(start + batch_size, n)))
        logps = sequence_logprobs(model(x.to(device)), y.to(device), mean=mean)
        out.append(torch.stack(logps.chunk(2), dim=1).cpu())
    model.train(was_training)
    return torch.cat(out)


def dpo_figures(model: torch.nn.Module, val: PairBatches, ref: torch.Tensor, cfg: AlignConfig,
                device: str) -> dict[str, float]:
    """Held-out DPO loss, and how often the implicit reward ranks the chosen reply first (ties count half)."""
    n = len(val) if cfg.eval_batches is None else min(len(val), cfg.eval_batches * cfg.batch_size)
    logps = pair_logprobs(model, val, cfg.batch_size, device, mean=cfg.loss == "ipo", limit=n)
    rewards = implicit_rewards(logps, ref[:n], beta=cfg.beta)
    margin = rewards[:, 0] - rewards[:, 1]
    accuracy = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
    return {"loss": float(dpo_loss(logps, ref[:n], beta=cfg.beta, kind=cfg.loss)), "reward_accuracy": accuracy,
            "reward_margin": float(margin.mean())}


# ---- rollouts (GRPO, PPO) ----

def end_of_turn_id(fmt: ChatFormat) -> int:
    """The token that ends an assistant turn in this format: what a finished reply is trained to end with."""
    special = fmt.tokenizer.special_ids.get(END_OF_TURN)
    if fmt.kind == "yunque" and special is not None:
        return special
    if not fmt.stop_ids:
        raise ValueError("the chat format names no end-of-turn token, so a reply's end cannot be learned")
    return min(fmt.stop_ids)


def rollout_seed(seed: int, rollout: int, row: int) -> int:
    """The sampling seed of one reply: a pure function of the run's seed, the rollout and the row."""
    digest = hashlib.blake2b(f"{seed}:{rollout}:{row}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def sample_replies(engine: Engine, fmt: ChatFormat, prompts: list[list[int]],
                   params: list[SamplingParams]) -> list[tuple[list[int], str, bool]]:
    """(reply ids, reply text, whether it ended its turn) for each prompt, all decoded as one batch through the
    engine's step API; row i samples with params[i] (its own seeded generator)."""
    batch = engine.new_batch()
    rows = engine.add_many(batch, prompts, [fmt.reply_params(p) for p in params])
    while engine.step(batch):
        pass
    return [(list(r.ids), r.text, r.finish_reason == "stop") for r in rows]


class Rollouts:
    """Rollouts of a GRPO/PPO run, made from the policy when first needed and saved in the run dir.

    Under torchrun (`runtime`, W processes) a rollout is global: prompts_per_rollout x W prompts, of which process
    r samples, rewards and scores its own prompts_per_rollout (reply seeds by global row, so W processes sample
    what one process with W times the prompts would), advantages computed there (a GRPO group stays in one
    process; PPO's are whitened per process); the parts are then gathered in rank order into the global rollout
    every process holds, its statistics taken over all of it, and rank 0 alone writes rollout.pt and the log. A
    minibatch is global too, and each process trains on its rows of it (runtime.shard)."""

    def __init__(self, cfg: AlignConfig, loop: LoopConfig, policy: torch.nn.Module, trainee: torch.nn.Module,
                 reference: torch.nn.Module, engine: Engine, fmt: ChatFormat, prompts: list[list[dict]],
                 reward, seq_len: int, runtime: Runtime | None = None) -> None:
        self.cfg, self.device, self.out = cfg, loop.device, Path(loop.out_dir)
        self.policy, self.trainee, self.reference, self.engine, self.fmt = policy, trainee, reference, engine, fmt
        self.prompts, self.reward, self.seq_len = prompts, reward, seq_len
        self.runtime = runtime or Runtime()
        self.mine = cfg.prompts_per_rollout * cfg.group_size  # the replies this process samples
        self.size = self.mine * self.runtime.world_size
        self.per_rollout = cfg.epochs * cfg.minibatches
        self.end_id = end_of_turn_id(fmt)
        self.kl_coef = cfg.kl_coef
        self.current: dict[str, Any] | None = None

    def minibatch(self, i: int) -> dict[str, torch.Tensor]:
        """Micro-batch i: a minibatch of rollout i // (epochs * minibatches)."""
        r, j = divmod(i, self.per_rollout)
        if self.current is None or self.current["index"] != r:
            self.current = self._load(r) or self._make(r)
        epoch, chunk = divmod(j, self.cfg.minibatches)
        order = np.random.default_rng([self.cfg.seed, r, epoch]).permutation(self.size)
        n = self.size // self.cfg.minibatches
        rows = torch.from_numpy(order[chunk * n:(chunk + 1) * n])
        data = self.current["data"]
        mask = data["y"][rows] != IGNORE
        T = int(mask.any(dim=0).nonzero().max()) + 1  # trim the padding every row of this minibatch has
        return {k: v[rows][:, :T].to(self.device) if v.dim() == 2 else v[rows].to(self.device)
                for k, v in data.items()}

    def _load(self, r: int) -> dict[str, Any] | None:
        path = self.out / ROLLOUT
        if not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["index"] == r:
            self.kl_coef = saved["next_kl_coef"]
            return saved
        if saved["index"] == r - 1:  # resumed at a rollout's start: the KL coefficient carries on from the last
            self.kl_coef = saved["next_kl_coef"]
        return None

    @torch.no_grad()
    def _make(self, r: int) -> dict[str, Any]:
        cfg, runtime = self.cfg, self.runtime
        k, P, first = cfg.group_size, cfg.prompts_per_rollout, runtime.rank * self.mine
        picks = _endless(len(self.prompts), P * runtime.world_size, seed=cfg.seed, step=r)
        picks = picks[runtime.rank * P:(runtime.rank + 1) * P]  # this process's share of the rollout's prompts
        conversations = [self.prompts[p] for p in picks for _ in range(k)]  # each prompt k times, groups adjacent
        prompt_ids = [self.fmt.prompt(m) for m in conversations]
        params = [SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 seed=rollout_seed(cfg.seed, r, first + j)) for j in range(self.mine)]
        with runtime.whole(self.policy) as policy:  # FSDP: gathered; every process is here
            self.engine.load_weights(policy)
        replies = sample_replies(self.engine, self.fmt, prompt_ids, params)
        rewards = torch.tensor(self.reward(conversations, [text for _, text, _ in replies]), dtype=torch.float32)
        x, y = _sequences(prompt_ids, [ids + [self.end_id] * ended for ids, _, ended in replies], self.seq_len,
                          self.fmt.tokenizer.pad_id or 0)
        x, y = x.to(self.device), y.to(self.device)
        mask = y != IGNORE
        was_training = self.trainee.training
        self.trainee.eval()
        if cfg.method == "ppo":
            logits, scores = self.trainee(x)
            values = scores["value"] * mask
        else:
            logits = self.trainee(x)
        old = target_logprobs(logits, y)
        ref = target_logprobs(self.reference(x), y)
        self.trainee.train(was_training)
        kl = (kl_penalty(old, ref, "k1") * mask).sum(dim=1)  # (N,) nats per reply
        data = {"x": x.cpu(), "y": y.cpu(), "old_logps": old.cpu(), "ref_logps": ref.cpu()}
        if cfg.method == "grpo":
            data["advantages"] = group_advantages(rewards.view(P, k)).view(-1)
        else:
            token_rewards = -self.kl_coef * kl_penalty(old, ref, "k1") * mask
            last = mask.long().cumsum(dim=1).argmax(dim=1)  # each reply's last token
            token_rewards[torch.arange(len(x)), last] += rewards.to(self.device)
            advantages, returns = gae(token_rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
            mean, std = masked_mean(advantages, mask), masked_mean((advantages - masked_mean(advantages, mask)) ** 2,
                                                                   mask).sqrt()
            data |= {"advantages": (((advantages - mean) / (std + 1e-8)) * mask).cpu(), "returns": returns.cpu(),
                     "values": values.cpu()}
        parts = runtime.gather_object((data, rewards, kl.cpu(), mask.sum(dim=1).cpu()))  # every process's, in order
        data = _concat([part[0] for part in parts], pad_id=self.fmt.tokenizer.pad_id or 0)
        rewards, kl, lengths = (torch.cat([part[i] for part in parts]) for i in (1, 2, 3))
        stats = {"rollout": r, "reward": round(float(rewards.mean()), 4), "kl": round(float(kl.mean()), 4),
                 "reply_tokens": round(float(lengths.float().mean()), 1), "kl_coef": self.kl_coef}
        next_kl = self.kl_coef
        if cfg.method == "ppo" and cfg.kl_target is not None:  # Ziegler et al. 2019: proportional control
            error = max(-0.2, min(0.2, float(kl.mean()) / cfg.kl_target - 1))
            next_kl = self.kl_coef * (1 + 0.1 * error)
        saved = {"index": r, "data": data, "kl_coef": self.kl_coef, "next_kl_coef": next_kl}
        if runtime.is_main:
            atomic_write(self.out / ROLLOUT, lambda p: torch.save(saved, p))
            with open(self.out / ROLLOUTS_LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(stats) + "\n")
        self.kl_coef = next_kl
        return saved


def _concat(parts: list[dict[str, torch.Tensor]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Rollout parts (each {name: (N_r, T_r) or (N_r,)}) as one, rows in order, right-padded to the longest T:
    inputs with pad_id, targets with IGNORE, the rest with 0 (masked out wherever they are used)."""
    if len(parts) == 1:
        return parts[0]
    T = max(part["x"].shape[1] for part in parts)
    fill = {"x": pad_id, "y": IGNORE}

    def padded(name: str, t: torch.Tensor) -> torch.Tensor:
        return t if t.dim() == 1 else torch.nn.functional.pad(t, (0, T - t.shape[1]), value=fill.get(name, 0))

    return {name: torch.cat([padded(name, part[name]) for part in parts]) for name in parts[0]}


def _endless(n: int, size: int, *, seed: int, step: int) -> list[int]:
    """Items step*size .. step*size+size-1 of an endless sequence of permutations of range(n), one an epoch."""
    positions = np.arange(step * size, (step + 1) * size)
    perms = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(positions // n)}
    return [int(perms[p // n][p % n]) for p in positions]


def _sequences(prompts: list[list[int]], replies: list[list[int]], seq_len: int,
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) (N, T) of prompt + reply, right-padded; targets IGNORE but on the reply's tokens. Cut to seq_len."""
    rows = [(p + r)[:seq_len + 1] for p, r in zip(prompts, replies)]
    T = max(len(ids) for ids in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (ids, p) in enumerate(zip(rows, prompts)):
        ids_t = torch.tensor(ids)
        x[b, :len(ids) - 1] = ids_t[:-1]
        y[b, len(p) - 1:len(ids) - 1] = ids_t[len(p):]
    return x, y


def rl_loss(cfg: AlignConfig):
    """The loss of a GRPO or PPO minibatch (see the module docstring)."""

    def loss(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        x, y = b["x"], b["y"]
        mask = y != IGNORE
        if cfg.method == "ppo":
            logits, scores = m(x)
            values = scores["value"]
            advantages = b["advantages"]
        else:
            logits = m(x)
            advantages = b["advantages"].unsqueeze(1) * mask  # a reply's advantage on each of its tokens
        logps = target_logprobs(logits, y)
        policy, _ = ppo_policy_loss(logps, b["old_logps"], advantages, mask, clip=cfg.clip)
        if cfg.method == "ppo":  # the KL penalty is in the rewards
            return policy + cfg.value_coef * value_loss(values, b["values"], b["returns"], mask, clip=cfg.clip)
        return policy + cfg.kl_coef * masked_mean(kl_penalty(logps, b["ref_logps"], "k3"), mask)

    return loss


def make_reward(cfg: AlignConfig, device: str):
    """reward(conversations, replies) -> list of floats, from the reward model or the reward function."""
    if cfg.reward:
        rm = load_reward_model(cfg.reward, device=device)
        return rm.score
    fn = import_reward_fn(cfg.reward_fn)

    def reward(conversations: list[list[dict]], replies: list[str]) -> list[float]:
        return [call_reward_fn(fn, cfg.reward_fn, m[-1]["content"], reply) for m, reply in zip(conversations, replies)]

    return reward


def _prepare_rl(cfg: AlignConfig, loop: LoopConfig, model, reference, fmt: ChatFormat, seq_len: int,
                figures: list[dict[str, float]], runtime: Runtime) -> Prepared:
    prompts = load_prompts(cfg.data)
    fits = [p for p in prompts if len(fmt.prompt(p)) < seq_len]
    if not fits:
        raise ValueError(f"every one of {len(prompts)} prompts has {seq_len} tokens or more; raise max_seq_len or "
                         f"shorten the prompts")
    train, val = split(fits, cfg.val_fraction, seed=cfg.seed)
    print(f"{len(prompts)} prompts: {len(train)} to train on, {len(val)} held out"
          + (f", {len(prompts) - len(fits)} left out (they fill the context)" if len(fits) < len(prompts) else ""))
    reward = make_reward(cfg, loop.device)
    layers = _attach(cfg, model)
    trainee = WithHeads(model, ("value",)).train() if cfg.method == "ppo" else model
    engine = Engine(model, fmt.tokenizer, device=loop.device)
    engine.stop_ids |= fmt.stop_ids
    rollouts = Rollouts(cfg, loop, model, trainee, reference, engine, fmt, train, reward, seq_len, runtime)
    held = val[:EVAL_PROMPTS]

    def evaluate(m: torch.nn.Module) -> float:  # every process: the same held-out prompts
        with runtime.whole(model) as policy:  # FSDP: gathered
            figures.append(rl_figures(policy, reference, engine, fmt, held, reward, cfg, seq_len))
        return -figures[-1]["reward"]  # the loop's "val_loss": the held-out reward, negated

    info = _info(trainee, layers, fmt, prompts={"train": len(train), "val": len(val)})
    tokens = rollouts.size // cfg.minibatches * (cfg.max_new_tokens // 2)
    return Prepared(trainee, rollouts.minibatch, rl_loss(cfg), evaluate if held else None,
                    tokens_per_step=tokens * loop.grad_accum, trainable_only=cfg.lora is not None,
                    fingerprint=fingerprint(fits), info=info, loss_falls=False)


# ---- the anchor: held to the reference on ordinary text ----

def anchor_windows(paths: tuple[str, ...], tokenizer, window: int) -> TokenWindows:
    """The anchor text of `paths` as token windows (documents read in order, at most ANCHOR_TOKENS tokens)."""
    ids: list[int] = []
    for doc in iter_documents(list(paths)):
        ids.extend(tokenizer.encode(doc.text, bos=tokenizer.bos_id is not None))
        if len(ids) >= ANCHOR_TOKENS:
            break
    if len(ids) <= window:
        raise ValueError(f"the anchor text ({', '.join(paths)}) has {len(ids)} tokens, fewer than one window of "
                         f"{window + 1}; give --anchor-text more ordinary text")
    return TokenWindows([np.asarray(ids[:ANCHOR_TOKENS], dtype=np.int64)])


def anchored(run: Prepared, cfg: AlignConfig, loop: LoopConfig, reference: torch.nn.Module, windows: TokenWindows,
             window: int) -> Prepared:
    """`run` held to the reference on anchor text: micro-batch i is run's micro-batch i with anchor windows (a
    pure function of i), and the loss gains anchor_coef * KL(reference || model), nats per token of the windows."""

    def batches(i: int):
        x, _ = windows.sample(cfg.anchor_batch_size, window, seed=cfg.seed, step=i)
        return run.batches(i), x.to(loop.device)

    def loss(m: torch.nn.Module, batch) -> torch.Tensor:
        inner, x = batch
        logits = m(x)
        if isinstance(logits, tuple):  # PPO's policy gives its hidden states too
            logits = logits[0]
        with torch.no_grad():
            ref_logits = reference(x)
        return run.loss(m, inner) + cfg.anchor_coef * token_kl(ref_logits, logits).mean()

    both = hashlib.sha256(f"{run.fingerprint}:{text_fingerprint(list(cfg.anchor_text))}".encode()).hexdigest()
    return dataclasses.replace(run, batches=batches, loss=loss, fingerprint=both,
                               tokens_per_step=run.tokens_per_step + cfg.anchor_batch_size * window * loop.grad_accum)


@torch.no_grad()
def rl_figures(policy: torch.nn.Module, reference: torch.nn.Module, engine: Engine, fmt: ChatFormat,
               prompts: list[list[dict]], reward, cfg: AlignConfig, seq_len: int) -> dict[str, float]:
    """Held-out figures of a policy: the mean reward of its greedy replies, and its KL to the reference in nats
    per reply (replies sampled as in rollouts, seeded; the exact per-position KL summed over each reply)."""
    engine.load_weights(policy)
    ids = [fmt.prompt(m) for m in prompts]
    greedy = sample_replies(engine, fmt, ids, [SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)]
                            * len(ids))
    scores = reward(prompts, [text for _, text, _ in greedy])
    return {"reward": float(np.mean(scores)),
            "kl": reply_kl(policy, reference, engine, fmt, ids, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, seq_len=seq_len, seed=cfg.seed)}


@torch.no_grad()
def reply_kl(policy: torch.nn.Module, reference: torch.nn.Module, engine: Engine, fmt: ChatFormat,
             prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0, seq_len: int,
             seed: int = 0) -> float:
    """KL(policy || reference) in nats per reply, mean over `prompts`: replies sampled from the policy (through
    `engine`, which must hold the policy's weights; row i seeded with seed + i), the exact KL of each position's
    next-token distributions summed over the reply."""
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
              for i in range(len(prompts))]
    replies = sample_replies(engine, fmt, prompts, params)
    end_id = end_of_turn_id(fmt)
    x, y = _sequences(prompts, [r + [end_id] * ended for r, _, ended in replies], seq_len,
                      fmt.tokenizer.pad_id or 0)
    device = next(policy.parameters()).device
    x, y = x.to(device), y.to(device)
    was_training = policy.training
    policy.eval()
    kl = (token_kl(policy(x), reference(x)) * (y != IGNORE)).sum(dim=1)
    policy.train(was_training)
    return float(kl.mean())


__all__ = ["main", "prepare", "pair_logprobs", "dpo_figures", "sample_replies", "reply_kl", "rollout_seed", "Rollouts",
           "rl_loss", "make_reward", "AlignConfig"]
