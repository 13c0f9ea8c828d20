"""`yunque align` and `yunque reward` at the command line: feedback given in `yunque chat` (a real subprocess
reading a script on stdin) becomes DPO training data; bad input is one line and leaves nothing behind."""

import json
import os
import subprocess
import sys

import pytest

from tests.cli.util import fails
from yunque.cli import main
from yunque.feedback import Preference, Rating, read_feedback
from yunque.modeldir import load_model

STEPS = ["--max-steps", "2", "--no-progress", "--precision", "fp32"]


def test_feedback_from_yunque_chat_trains_dpo(base, tmp_path, capsys):
    home = tmp_path / "home"
    script = "hola\n/good\n/reset\nhola\n/bad\n/reset\ndi sol\n/prefer\n2\n/good\n/exit\n"
    env = {**os.environ, "YUNQUE_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "yunque", "chat", str(base), "--max-new-tokens", "8", "--seed", "3"],
                          input=script, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(rated the last reply") == 3 and "second reply: " in done.stdout
    assert "(saved: reply 2 preferred" in done.stdout
    records = read_feedback([home / "feedback"])
    assert [type(r) for r in records] == [Rating, Rating, Preference, Rating]
    assert records[0].messages == ({"role": "user", "content": "hola"},) and records[0].rating == 1
    assert records[1].rating == -1 and records[0].reply != records[1].reply  # the seed moved on: another reply
    pref, after = records[2], records[3]
    assert pref.messages == ({"role": "user", "content": "di sol"},) and pref.chosen != pref.rejected
    assert after.reply == pref.chosen  # the preferred reply became the one in the history

    out = tmp_path / "dpo"
    assert main(["align", "--method", "dpo", "--model", str(base), "--data", str(home / "feedback"), "--out",
                 str(out), "--val-fraction", "0", "--batch-size", "2", *STEPS]) == 0
    assert f"-> {out}" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["config"]["data"] == [str((home / "feedback").resolve())]
    load_model(out)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a} + {b} =", "completion": str(a + b)}) + "\n"
                            for a in range(10, 14) for b in range(20, 24)), encoding="utf-8")
    return path


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "bad_rewards.py").write_text(
        "def boom(prompt, completion):\n    raise RuntimeError('no score for you')\n"
        "def nan(prompt, completion):\n    return float('nan')\n"
        "def text(prompt, completion):\n    return 'high'\n", encoding="utf-8")
    (tmp_path / "broken_rewards.py").write_text("import not_a_module_anywhere\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("spec, words", [
    ("bad_rewards:boom", ["--reward-fn bad_rewards:boom raised RuntimeError: no score for you"]),
    ("bad_rewards:nan", ["--reward-fn bad_rewards:nan returned nan", "finite number"]),
    ("bad_rewards:text", ["returned 'high'"]),
    ("broken_rewards:f", ["cannot import 'broken_rewards'", "ModuleNotFoundError"]),
    ("bad_rewards:missing", ["bad_rewards has no function 'missing'"]),
    ("no_colon", ["must be module:function"]),
])
def test_a_bad_reward_function_is_one_line_and_writes_nothing(base, prompts, reward_module, tmp_path, capsys, spec,
                                                              words):
    out = tmp_path / "grpo"
    fails(capsys, ["align", "--method", "grpo", "--model", str(base), "--data", str(prompts), "--out", str(out),
                   "--reward-fn", spec, "--group-size", "2", "--prompts-per-rollout", "2", "--max-new-tokens", "4",
                   *STEPS], *words)
    assert not out.exists()


def test_bad_pairs_and_settings_are_one_line(base, prompts, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                     '{"prompt": "q", "chosen": "a", "rejected": "a"}\n', encoding="utf-8")
    out = tmp_path / "out"
    fails(capsys, ["align", "--model", str(base), "--data", str(pairs), "--out", str(out), *STEPS],
          f"{pairs}:2:", "the same reply")
    fails(capsys, ["align", "--model", str(base), "--data", str(pairs), "--out", str(out), "--reward-fn", "m:f"],
          "DPO learns from preference pairs")
    fails(capsys, ["align", "--method", "ppo", "--model", str(base), "--data", str(prompts), "--out", str(out)],
          "ppo needs one reward")
    fails(capsys, ["align", "--method", "ppo", "--model", str(base), "--data", str(prompts), "--out", str(out),
                   "--reward", str(base), *STEPS], "not a reward model dir")
    fails(capsys, ["reward", "train", "--model", str(base), "--data", str(prompts), "--out", str(out), *STEPS],
          f"{prompts}:1:", "missing field(s) chosen, rejected")
    assert not out.exists()


def test_a_resumed_run_says_the_method_it_ran(base, prompts, reward_module, tmp_path, capsys):
    (tmp_path / "good_rewards.py").write_text("def short(prompt, completion):\n    return -len(completion)\n",
                                              encoding="utf-8")
    out = tmp_path / "grpo"
    grpo = ["--model", str(base), "--data", str(prompts), "--reward-fn", "good_rewards:short", "--group-size", "2",
            "--prompts-per-rollout", "2", "--max-new-tokens", "4", "--checkpoint-every", "1"]
    assert main(["align", "--method", "grpo", *grpo, "--out", str(out), "--no-progress", "--precision", "fp32",
                 "--max-steps", "1"]) == 0
    assert "aligned (grpo)" in capsys.readouterr().out
    assert main(["align", "--out", str(out), "--resume", "--max-steps", "2", "--no-progress"]) == 0
    assert "aligned (grpo)" in capsys.readouterr().out  # the run's method, not the flag's default (dpo)
