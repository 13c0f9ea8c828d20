"""Training under torchrun on CPU: gloo, two processes of one thread each, a tiny model.

Tolerances. Two processes with batch b see exactly the rows one process with batch 2b sees (rank r takes rows
[r*b, (r+1)*b) of the same global micro-batch), so the only difference is the order of floating-point sums: the
all-reduce adds two half-batch gradients where one process sums over the whole batch in one matmul, and FSDP
reduce-scatters where DDP all-reduces. In fp32 that moves the weights (of size ~1) by a few ulps: measured at most
1.9e-7 after 20 steps and 1.2e-7 after 60 steps with a kill and a resume on another number of processes, and the
losses by at most the 1e-5 to which metrics.jsonl rounds them. So weights must agree within 1e-5 and losses within
1e-4: room for other CPUs' kernels, far below what a wrong shard, a missing or doubled all-reduce, a lost
optimizer state or a skipped micro-batch would do (one AdamW step at lr 1e-3 moves a weight by up to 1e-3).
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

from tests.train.dist_curves import LOOP, config
from yunque.config import preset
from yunque.model.gpt import GPT
from yunque.modeldir import checkpoint_progress, read_metrics
from yunque.train.distributed import DistributedRuntime, choose_parallel, failure_line, load_sharded
from yunque.train.optim import make_adamw
from yunque.train.pretrain import main
from yunque.train.run import per_process_batch

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 300
FLAGS = ["--tokenizer", "bytes", "--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--max-steps", "60",
         "--eval-every", "30", "--eval-batches", "2", "--val-fraction", "0.5", "--checkpoint-every", "2",
         "--checkpoint-minutes", "0", "--precision", "fp32", "--compile", "off", "--threads", "1", "--no-progress"]
LOSS_TOL, WEIGHT_TOL = 1e-4, 1e-5


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
