"""Reward models: Bradley-Terry on pairs raises held-out pairwise accuracy; the dir loads to score (full and LoRA),
`yunque reward score` prints the rewards, and PPO takes one as its reward."""

import json

import pytest

from yunque.cli import main as cli
from yunque.config import AlignConfig, LoopConfig, LoraConfig, RewardConfig
from yunque.data.preferences import load_pairs
from yunque.model.heads import HEADS
from yunque.train.align import main as align
from yunque.train.reward import main
from yunque.train.scoring import REWARD_INFO, load_reward_model

WORDS = ["sol", "mar", "luz", "pan", "té", "río", "flor", "nube", "roca", "hoja", "lago", "miel", "pez", "ola"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": f"di {w}", "chosen": f"{w}, gracias.", "rejected": f"{w}"} for w in WORDS * 2]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def loop(out, steps, lr=3e-3):
    return LoopConfig(out_dir=str(out), max_steps=steps, lr=lr, warmup_steps=1, weight_decay=0.0, precision="fp32",
                      eval_every=0, progress=False, compile="off")


@pytest.fixture(scope="module")
def rm(base, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "rm"
    s = main(RewardConfig(model=str(base), data=(str(pairs),), out=str(out), batch_size=4, val_fraction=0.25,
                          loop=loop(out, 25)))
    return out, s


def test_a_reward_model_learns_the_preference_and_scores_with_it(rm, pairs, capsys):
    out, s = rm
    assert s["after"]["accuracy"] == 1.0 and s["after"]["loss"] < s["before"]["loss"] - 0.3, s
    info = json.loads((out / REWARD_INFO).read_text())
    assert info["kind"] == "reward_model" and info["held_out"]["accuracy"] == 1.0 and info["steps"] == 25
    assert (out / HEADS).is_file() and (out / "config.json").is_file()
    scorer = load_reward_model(out)
    pair = load_pairs([pairs])[0]
    chosen, rejected = scorer.score([pair.messages] * 2, [pair.chosen, pair.rejected])
    assert chosen > rejected
    capsys.readouterr()
    assert cli(["reward", "score", str(out), "--data", str(pairs), "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert len(rows) == len(WORDS) * 2 and rows[0]["chosen"] == pytest.approx(chosen, abs=1e-5)
    assert "the chosen reply scores higher in" in captured.err


def test_a_lora_reward_model_is_an_adapter_dir_with_a_head(base, pairs, tmp_path):
    out = tmp_path / "rm"
    s = main(RewardConfig(model=str(base), data=(str(pairs),), out=str(out), batch_size=4, val_fraction=0.25,
                          lora=LoraConfig(rank=4, alpha=8), loop=loop(out, 15, lr=1e-2)))
    assert s["trainable_parameters"] < s["parameters"] / 2 and s["after"]["accuracy"] >= 0.75, s
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    scorer = load_reward_model(out)
    pair = load_pairs([pairs])[0]
    assert len(scorer.score([pair.messages], [pair.chosen])) == 1


def test_ppo_takes_a_reward_model(base, pairs, rm, tmp_path):
    out = tmp_path / "ppo"
    s = align(AlignConfig(model=str(base), data=(str(pairs),), out=str(out), method="ppo", reward=str(rm[0]),
                          group_size=2, prompts_per_rollout=2, max_new_tokens=6, loop=loop(out, 2)))
    assert s["steps"] == 2 and set(s["after"]) == {"reward", "kl"}


def test_not_a_reward_model(base, tmp_path):
    with pytest.raises(ValueError, match="not a reward model dir"):
        load_reward_model(base)
    with pytest.raises(ValueError, match="does not exist"):
        load_reward_model(tmp_path / "nothing")
