"""Under torchrun: train a reward model and DPO on one tiny chat model, each with DDP and with FSDP (2 pairs a
process, 6 steps), and PPO for 2 rollouts with DDP (its value head wrapped with the policy), in one process group.
tests/train/test_distributed.py compares the curves with one process's at 4 pairs.

    torchrun --standalone --nproc-per-node 2 tests/train/dist_align.py OUT_BASE BASE_MODEL PAIRS

Run from a dir holding align_rewards.py (PPO's reward function, imported from the working directory).
"""

import dataclasses
import sys
from pathlib import Path

from yunque.config import AlignConfig, LoopConfig, RewardConfig
from yunque.train.align import main as align
from yunque.train.distributed import session
from yunque.train.reward import main as reward

LOOP = LoopConfig(max_steps=6, lr=3e-3, warmup_steps=1, weight_decay=0.0, precision="fp32", compile="off",
                  eval_every=0, log_every=1, progress=False, threads=1, checkpoint_minutes=0)


def reward_config(out: Path, base: str, pairs: str, batch_size: int, loop: LoopConfig) -> RewardConfig:
    """The reward run every curve test makes (one process at 4 pairs, or two at 2)."""
    return RewardConfig(model=base, data=(pairs,), out=str(out), batch_size=batch_size, val_fraction=0.25,
                        loop=dataclasses.replace(loop, out_dir=str(out)))


def dpo_config(out: Path, base: str, pairs: str, batch_size: int, loop: LoopConfig) -> AlignConfig:
    """The DPO run every curve test makes."""
    return AlignConfig(model=base, data=(pairs,), out=str(out), batch_size=batch_size, val_fraction=0.25,
                       loop=dataclasses.replace(loop, out_dir=str(out)))


def ppo_config(out: Path, base: str, pairs: str) -> AlignConfig:
    return AlignConfig(model=base, data=(pairs,), out=str(out), method="ppo", reward_fn="align_rewards:a_share",
                       group_size=2, prompts_per_rollout=1, max_new_tokens=6, val_fraction=0.1,
                       loop=dataclasses.replace(LOOP, max_steps=2, out_dir=str(out), parallel="ddp"))


if __name__ == "__main__":
    out, base, pairs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    with session("align", LOOP) as runtime:
        for parallel in ("ddp", "fsdp"):
            loop = dataclasses.replace(LOOP, parallel=parallel)
            reward(reward_config(out / f"reward-{parallel}", base, pairs, 2, loop), runtime)
            align(dpo_config(out / f"dpo-{parallel}", base, pairs, 2, loop), runtime)
        align(ppo_config(out / "ppo-ddp", base, pairs), runtime)
