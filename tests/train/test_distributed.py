"""Training under torchrun on CPU: gloo, two processes of one thread each, a tiny model.

Tolerances. Two processes with batch b see exactly the rows one process with batch 2b sees (rank r takes rows
[r*b, (r+1)*b) of the same global micro-batch), so the only difference is the order of floating-point sums: the
all-reduce adds two half-batch gradients where one process sums over the whole batch in one matmul, and FSDP
reduce-scatters where DDP all-reduces. In fp32 that moves the weights (of size ~1) by a few ulps: measured at most
1.9e-7 after 20 steps and 1.2e-7 after 60 steps with a kill and a resume on another number of processes, and the
losses by at most the 1e-5 to which metrics.jsonl rounds them. So weights must agree within 1e-5 and losses within
1e-4: room for other CPUs' kernels, far below what a wrong shard, a missing or doubled all-reduce, a lost
optimizer state or a skipped micro-batch would do (one AdamW step at lr 1e-3 moves a weight by up to 1e-3).

Reward models and DPO (6 steps at lr 3e-3, training moves weights by up to 1.3e-2) agree as closely in their
losses, and within ALIGN_WEIGHT_TOL = 5e-5 in their weights: measured at most 1.1e-5, larger than pretraining's
because AdamW divides each gradient by its own running size, so a weight whose gradient is nearly zero moves by
up to lr per step in the direction its rounding noise points. The reward head's bias is the extreme case and is
not compared: the Bradley-Terry loss depends on reward differences only, so its gradient is zero up to rounding
(it ends 3.0e-3 apart in the two runs).
"""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train import dist_align
from tests.train.dist_curves import LOOP, config
from yunque.config import AlignConfig, RewardConfig, preset
from yunque.model.gpt import GPT
from yunque.model.heads import HEADS
from yunque.modeldir import checkpoint_progress, read_metrics
from yunque.train.align import ROLLOUT, ROLLOUTS_LOG
from yunque.train.align import main as align
from yunque.train.distributed import DistributedRuntime, choose_parallel, failure_line, load_sharded
from yunque.train.optim import make_adamw
from yunque.train.pretrain import main
from yunque.train.reward import main as reward
from yunque.train.run import per_process_batch
from yunque.train.scoring import REWARD_INFO

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 300
FLAGS = ["--tokenizer", "bytes", "--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--max-steps", "60",
         "--eval-every", "30", "--eval-batches", "2", "--val-fraction", "0.5", "--checkpoint-every", "2",
         "--checkpoint-minutes", "0", "--precision", "fp32", "--compile", "off", "--threads", "1", "--no-progress"]
LOSS_TOL, WEIGHT_TOL, ALIGN_WEIGHT_TOL = 1e-4, 1e-5, 5e-5


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    """Two documents, so that one is held out (--val-fraction 0.5) and evaluation runs under every runtime."""
    folder = tmp_path_factory.mktemp("data")
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    paths = [folder / "a.txt", folder / "b.txt"]
    paths[0].write_text(text[:12000], encoding="utf-8")
    paths[1].write_text(text[12000:20000], encoding="utf-8")
    return [str(p) for p in paths]


def torchrun(n: int, *args: str, script: Path | None = None, capture: bool = True,
             cwd: Path | None = None) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node n` of `python -m yunque ARGS` (or of `script`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    cmd += [str(script)] if script else ["-m", "yunque"]
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(cmd + list(args), stdout=out, stderr=out, text=True, env=ENV, start_new_session=True,
                            cwd=cwd)


def one_process(*args: str, script: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "yunque"]
    return subprocess.Popen(cmd + list(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)


def job(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts each worker in a session of its own, so a signal to the
    launcher's process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def kill_job(p: subprocess.Popen) -> None:
    """SIGKILL the launcher and all its workers at once, as a machine failing would, and wait until they are gone."""
    pids = job(p.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    p.wait(timeout=60)
    deadline = time.time() + 60
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids):
        assert time.time() < deadline, "the killed workers did not end"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def finish(p: subprocess.Popen) -> tuple[str, str]:
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_job(p)
        raise
    assert p.returncode == 0, err
    return out or "", err or ""


def kill_at_checkpoint(p: subprocess.Popen, out: Path, after_step: int) -> int:
    """SIGKILL the job (launcher and workers) once `out` holds a checkpoint past `after_step`; its step. The job
    runs stall_after.py with `after_step`, so it waits there to be killed."""
    deadline = time.time() + TIMEOUT
    while (progress := checkpoint_progress(out) if out.is_dir() else None) is None or progress[0] <= after_step:
        assert p.poll() is None, f"the run ended before it was killed: {p.stderr.read() if p.stderr else ''}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.01)
    kill_job(p)
    return checkpoint_progress(out)[0]


def losses(run: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(run / "metrics.jsonl") if key in r]


def max_weight_difference(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


# ---- two processes follow one: DDP, FSDP, accumulation ----

@pytest.fixture(scope="module")
def curves(data, tmp_path_factory):
    """dist_curves.py's runs under torchrun with two processes, and one process's twins at batch 4."""
    base = tmp_path_factory.mktemp("curves")
    finish(torchrun(2, str(base), *data, script=HERE / "dist_curves.py"))
    for accum in (1, 2):
        main(config(base / f"one-accum{accum}", data, 4, dataclasses.replace(LOOP, grad_accum=accum)))
    return base


@pytest.mark.parametrize("run, twin", [("ddp", "one-accum1"), ("fsdp", "ddp"), ("ddp-accum", "one-accum2"),
                                       ("fsdp-accum", "ddp-accum"), ("fsdp-recompute", "fsdp")])
def test_two_processes_with_batch_b_follow_one_with_batch_2b(curves, run, twin):
    a, b = curves / run, curves / twin
    assert len(losses(a)) == len(losses(b)) == 20
    assert max(abs(x - y) for x, y in zip(losses(a), losses(b))) <= LOSS_TOL
    assert len(losses(a, "val_loss")) == 2
    assert max(abs(x - y) for x, y in zip(losses(a, "val_loss"), losses(b, "val_loss"))) <= LOSS_TOL
    assert max_weight_difference(a, b) <= WEIGHT_TOL
    assert losses(a)[-1] < losses(a)[0] - 0.3  # it learned: the curves compared are not flat


def test_the_exported_weights_are_the_sharded_checkpoint_gathered(curves):
    """model.safetensors (written by rank 0 from a gathered full state dict) holds the weights of the FSDP run's
    sharded checkpoint, which loads here in one process without torchrun."""
    run = curves / "fsdp"
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["sharded"] == "checkpoint/step-00000020" and state["world_size"] == 2
    assert sorted(p.name for p in (run / state["sharded"]).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "rng-0.pt", "rng-1.pt"]  # each rank wrote its part
    model = GPT(preset("tiny", vocab_size=263, max_seq_len=32))
    optimizer = make_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    load_sharded(run / state["sharded"], model, optimizer, rank=0)
    exported = load_file(run / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items() if k in exported)
    assert "lm_head.weight" not in exported and len(exported) == len(model.state_dict()) - 1  # tied, stored once


# ---- kill a two-process run; resume it on one process and on two ----

@pytest.fixture(scope="module")
def whole(data, tmp_path_factory):
    """An uninterrupted two-process run of 60 steps, and what it printed."""
    out = tmp_path_factory.mktemp("whole") / "run"
    stdout, stderr = finish(torchrun(2, "pretrain", "--out", str(out), "--data", *data, *FLAGS))
    return out, stdout, stderr


def test_sigkill_then_resume_on_two_and_on_one_process_gives_the_uninterrupted_weights(whole, data, tmp_path):
    killed = tmp_path / "killed"
    step = kill_at_checkpoint(torchrun(2, "10", "pretrain", "--out", str(killed), "--data", *data, *FLAGS,
                                       script=HERE / "stall_after.py", capture=False), killed, after_step=10)
    assert step == 12  # the first checkpoint past step 10 (one every 2 steps), 48 steps before the end
    assert torch.load(killed / "train_state.pt", weights_only=True)["sharded"] == f"checkpoint/step-{step:08d}"
    two, one = tmp_path / "two", tmp_path / "one"
    shutil.copytree(killed, two)
    shutil.copytree(killed, one)

    finish(torchrun(2, "pretrain", "--out", str(two), "--resume", "--no-progress", "--parallel", "fsdp"))
    assert max_weight_difference(two, whole[0]) <= WEIGHT_TOL  # DDP's shards, read into FSDP's

    # one process without torchrun reads the sharded checkpoint (batch 4 now), is killed after a checkpoint of its
    # own (one file), and two processes finish the run from that: 2 -> 1 -> 2
    stop = kill_at_checkpoint(one_process(str(step), "pretrain", "--out", str(one), "--resume", "--checkpoint-every",
                                          "1", "--no-progress", script=HERE / "stall_after.py"), one, after_step=step)
    assert stop == step + 1 and "sharded" not in torch.load(one / "train_state.pt", weights_only=True)
    finish(torchrun(2, "pretrain", "--out", str(one), "--resume", "--no-progress", "--parallel", "fsdp"))
    assert max_weight_difference(one, whole[0]) <= WEIGHT_TOL  # one file, sharded by FSDP as it loads
    assert abs(losses(one)[-1] - losses(whole[0])[-1]) <= LOSS_TOL
    assert checkpoint_progress(killed) == (step, 60)  # the kill was real: no worker went on alone


def test_rank_0_alone_writes_the_run_dir_and_prints(whole):
    out, stdout, stderr = whole
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "config.json", "data", "loss.png",
                                                     "metrics.jsonl", "model.safetensors", "run.json",
                                                     "tokenizer.json", "train_state.pt"]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # one writer: no line twice
    assert stdout.count("trained 123,648 parameters for 60 steps") == 1, stdout
    assert json.loads((out / "run.json").read_text())["loop"]["world_size"] == 2
    assert "Traceback" not in stderr


def test_a_failure_on_one_rank_ends_the_job_with_one_line(data, tmp_path):
    p = torchrun(2, "pretrain", "--out", str(tmp_path / "run"), "--data", *data, *FLAGS,
                 script=HERE / "failing_rank.py")
    start = time.perf_counter()
    _, stderr = p.communicate(timeout=TIMEOUT)
    assert p.returncode != 0
    ours = [line for line in stderr.splitlines() if line.startswith("yunque")]
    assert ours == ["yunque pretrain: error: rank 1 of 2: injected: the disk under rank 1 failed"], stderr
    assert time.perf_counter() - start < 120  # no hang: the other rank ends when its collective breaks
    assert checkpoint_progress(tmp_path / "run") == (2, 60)  # rank 1 failed in step 4: step 2's checkpoint stays


# ---- reward models and alignment under torchrun ----

WORDS = ["sol", "mar", "luz", "pan", "té", "río", "flor", "nube", "roca", "hoja", "lago", "miel"]


@pytest.fixture(scope="module")
def align_data(tmp_path_factory):
    """(a working dir holding reward functions, preference pairs a random model does not prefer: "w!" over "w?").
    align_rewards:hashed differs between almost any two replies, so that every GRPO group has advantages."""
    cwd = tmp_path_factory.mktemp("align")
    (cwd / "align_rewards.py").write_text("def a_share(prompt, completion):\n"
                                          "    return completion.count('a') / max(len(completion), 1)\n"
                                          "def hashed(prompt, completion):\n"
                                          "    return sum(map(ord, completion)) % 97 / 97\n")
    pairs = cwd / "pairs.jsonl"
    rows = [{"prompt": f"di {w}", "chosen": f"{w}!", "rejected": f"{w}?"} for w in WORDS * 2]
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return cwd, pairs


@pytest.fixture(scope="module")
def align_curves(base, align_data, tmp_path_factory):
    """dist_align.py's runs under torchrun with two processes, and one process's reward and DPO runs at 4 pairs."""
    cwd, pairs = align_data
    out = tmp_path_factory.mktemp("align-curves")
    finish(torchrun(2, str(out), str(base), str(pairs), script=HERE / "dist_align.py", cwd=cwd))
    reward(dist_align.reward_config(out / "reward-one", str(base), str(pairs), 4, dist_align.LOOP))
    align(dist_align.dpo_config(out / "dpo-one", str(base), str(pairs), 4, dist_align.LOOP))
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_reward_and_dpo_on_two_processes_with_b_pairs_follow_one_with_2b(align_curves, kind, parallel):
    a, b = align_curves / f"{kind}-{parallel}", align_curves / f"{kind}-one"
    assert len(losses(a)) == len(losses(b)) == 6
    assert max(abs(x - y) for x, y in zip(losses(a), losses(b))) <= LOSS_TOL
    assert len(losses(a, "val_loss")) == 1 and abs(losses(a, "val_loss")[0] - losses(b, "val_loss")[0]) <= LOSS_TOL
    assert max_weight_difference(a, b) <= ALIGN_WEIGHT_TOL
    assert losses(a)[-1] < losses(a)[0] - 0.2  # it learned: the curves compared are not flat
    steps = [r["step"] for r in read_metrics(a / "metrics.jsonl")]
    assert steps == list(range(1, 7))  # rank 0 alone wrote the metrics
    if kind == "reward":  # the head, written by rank 0 beside the model as one process writes it
        x, y = load_file(a / HEADS), load_file(b / HEADS)
        assert x.keys() == y.keys() == {"reward.weight", "reward.bias"}
        assert (x["reward.weight"] - y["reward.weight"]).abs().max() <= ALIGN_WEIGHT_TOL
        info = [json.loads((run / REWARD_INFO).read_text()) for run in (a, b)]
        assert info[0]["held_out"] == pytest.approx(info[1]["held_out"], abs=LOSS_TOL) and info[0]["steps"] == 6


def test_a_two_process_reward_run_resumes_in_one_process_as_one_process_run_does(align_curves, tmp_path):
    """The FSDP run's sharded checkpoint (GPT and head) continues in one process without torchrun, at the same
    global batch, where the one-process run continues from its one-file checkpoint with heads.safetensors."""
    runs = {}
    for name in ("reward-fsdp", "reward-one"):
        runs[name] = out = shutil.copytree(align_curves / name, tmp_path / name)  # resume takes the run's settings
        reward(RewardConfig(model="", data=(), out=str(out),
                            loop=dataclasses.replace(dist_align.LOOP, max_steps=8, resume=True, out_dir=str(out))))
    a, b = runs["reward-fsdp"], runs["reward-one"]
    assert [r["step"] for r in read_metrics(a / "metrics.jsonl")] == list(range(1, 9))
    assert max(abs(x - y) for x, y in zip(losses(a), losses(b))) <= LOSS_TOL
    assert max_weight_difference(a, b) <= ALIGN_WEIGHT_TOL
    heads = [load_file(run / HEADS)["reward.weight"] for run in (a, b)]
    assert (heads[0] - heads[1]).abs().max() <= ALIGN_WEIGHT_TOL


def test_ppo_under_ddp_gathers_each_processs_rollout_and_writes_it_once(align_curves):
    out = align_curves / "ppo-ddp"
    log = [json.loads(line) for line in (out / ROLLOUTS_LOG).read_text().splitlines()]
    assert [r["rollout"] for r in log] == [0, 1]  # one line a rollout: rank 0's
    rollout = torch.load(out / ROLLOUT, weights_only=True)
    assert rollout["index"] == 1 and rollout["data"]["x"].shape[0] == 2 * 2  # 2 processes x 1 prompt x 2 replies
    heads, weights = load_file(out / HEADS), load_file(out / "model.safetensors")
    assert set(heads) == {"value.weight", "value.bias"}
    assert all(t.isfinite().all() for t in [*heads.values(), *weights.values()])


def test_grpo_under_torchrun_with_fsdp_writes_one_model_dir_from_rank_0(base, align_data, tmp_path):
    cwd, pairs = align_data
    out = tmp_path / "grpo"
    stdout, stderr = finish(torchrun(
        2, "align", "--method", "grpo", "--model", str(base), "--data", str(pairs), "--out", str(out),
        "--reward-fn", "align_rewards:hashed", "--group-size", "4", "--prompts-per-rollout", "1",
        "--max-new-tokens", "6", "--max-steps", "2", "--lr", "1e-2", "--parallel", "fsdp", "--precision", "fp32",
        "--threads", "1", "--no-progress", cwd=cwd))
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint", "config.json", "loss.png", "metrics.jsonl", "model.safetensors", "rollout.pt",
        "rollouts.jsonl", "run.json", "tokenizer.json", "train_state.pt"]
    assert [json.loads(line)["rollout"] for line in (out / ROLLOUTS_LOG).read_text().splitlines()] == [0, 1]
    assert torch.load(out / ROLLOUT, weights_only=True)["data"]["x"].shape[0] == 2 * 4  # both processes' replies
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert after.keys() == before.keys() and all(t.isfinite().all() for t in after.values())
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-3  # it trained
    assert stdout.count("aligned (grpo)") == 1 and "Traceback" not in stderr, stdout + stderr
    assert json.loads((out / "run.json").read_text())["loop"]["world_size"] == 2


def test_a_failure_on_one_rank_ends_reward_training_with_one_line(base, align_data, tmp_path):
    _, pairs = align_data
    p = torchrun(2, "reward", "train", "--model", str(base), "--data", str(pairs), "--out", str(tmp_path / "rm"),
                 "--batch-size", "2", "--max-steps", "8", "--checkpoint-every", "2", "--checkpoint-minutes", "0",
                 "--precision", "fp32", "--threads", "1", "--no-progress", script=HERE / "failing_rank.py")
    _, stderr = p.communicate(timeout=TIMEOUT)
    assert p.returncode != 0
    ours = [line for line in stderr.splitlines() if line.startswith("yunque")]
    assert ours == ["yunque reward train: error: rank 1 of 2: injected: the disk under rank 1 failed"], stderr
    assert checkpoint_progress(tmp_path / "rm") == (2, 8)  # rank 1 failed in step 4: step 2's checkpoint stays


# ---- the parts, without processes ----

def test_auto_chooses_ddp_while_a_whole_model_fits_in_half_the_memory():
    assert choose_parallel(10**6, 64 * 2**20) == "ddp"  # 16 MB of weights, gradients and AdamW state
    assert choose_parallel(10**9, 16 * 2**30) == "fsdp"  # 16 GB in 16 GB: shard it


def test_each_rank_takes_its_rows_of_the_global_batch():
    x, y = torch.arange(12).view(6, 2), torch.arange(6)
    parts = [DistributedRuntime(r, 3, r, 3, "cpu").shard((x, y)) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(parts[1][1], torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="does not split over 4 processes"):
        DistributedRuntime(0, 4, 0, 4, "cpu").shard(x)


def test_resuming_on_another_world_size_keeps_the_global_batch(tmp_path):
    cfg = config(tmp_path, [], 2, LOOP)
    assert per_process_batch(cfg, 2, 1).batch_size == 4 and per_process_batch(cfg, 1, 2).batch_size == 1
    with pytest.raises(ValueError, match="3 processes cannot share evenly"):
        per_process_batch(cfg, 2, 3)
    # a rollout's prompts are counted per process, as DPO's pairs are
    rl = AlignConfig(model="m", data=("d",), out="o", method="grpo", reward_fn="m:f", prompts_per_rollout=2)
    assert per_process_batch(rl, 2, 1).prompts_per_rollout == 4 and per_process_batch(rl, 2, 1).batch_size == 8
    dpo = AlignConfig(model="m", data=("d",), out="o", batch_size=3)
    assert per_process_batch(dpo, 2, 3).batch_size == 2 and per_process_batch(dpo, 2, 3).prompts_per_rollout == 4


def test_only_the_failing_rank_speaks():
    rank0, rank1 = DistributedRuntime(0, 2, 0, 2, "cpu"), DistributedRuntime(1, 2, 1, 2, "cpu")
    assert failure_line(ValueError("bad --lr"), rank1, "sft", 600) == (1, "yunque sft: error: rank 1 of 2: bad --lr")
    broken = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242")
    assert failure_line(broken, rank0, "sft", 600) == (1, None)
    code, line = failure_line(RuntimeError("Timed out waiting 600000ms for recv"), rank0, "sft", 600)
    assert code == 1 and "waited 600 s for the other processes" in line and "--peer-timeout" in line
    assert failure_line(KeyboardInterrupt("saved"), rank1, "sft", 600) == (130, None)
    assert failure_line(FloatingPointError("loss became nan"), rank1, "sft", 600) == (1, None)


def test_activation_checkpointing_changes_memory_not_results(data, tmp_path):
    plain = main(config(tmp_path / "plain", data, 4, dataclasses.replace(LOOP, max_steps=5)))
    again = main(config(tmp_path / "recompute", data, 4, dataclasses.replace(LOOP, max_steps=5,
                                                                           activation_checkpointing=True)))
    assert plain["loss"] == again["loss"]
    assert max_weight_difference(tmp_path / "plain", tmp_path / "recompute") == 0.0
