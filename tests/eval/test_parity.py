"""Parity with lm-evaluation-harness (a test-only dependency), offline.

A tiny random yunque model with a BPE tokenizer is exported to a Hugging Face dir; lm-eval's HF backend scores it
on HellaSwag and ARC-Easy from ../shared/data through local task YAMLs (datasets' json builder, data_files), and
`yunque eval`'s built-in tasks score the yunque dir. Zero-shot and 5-shot: the same prompts (few-shot examples drawn
by lm-eval's seeded sampler), per-item log-likelihoods within 1e-4, identical acc and acc_norm. Rolling perplexity
(lm-eval's wikitext scoring) on Tiny Shakespeare's speeches: the same per-document log-likelihoods and metrics.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # set before datasets/transformers are imported: nothing downloads
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager

from tests.eval.lm_eval_tasks import write_lm_eval_tasks
from yunque.config import preset
from yunque.eval.harness import evaluate
from yunque.eval.lm import LocalLM
from yunque.eval.task import context, iter_items, load_task
from yunque.interop.hf import export_hf
from yunque.model.gpt import GPT
from yunque.modeldir import load_model, save_model
from yunque.tokenizer.bpe import train_bpe

N = 24  # items per task and setting


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, shared_data):
    """(yunque dir, HF export of it, dir of lm-eval task YAMLs over the shared data)."""
    root = tmp_path_factory.mktemp("parity")
    text = (shared_data / "tinyshakespeare.txt").read_text()[:200_000]
    tok = train_bpe([text], 1024)
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512))
    save_model(root / "yunque", model, tok)
    export_hf(root / "yunque", root / "hf")
    tasks = write_lm_eval_tasks(shared_data, root)
    return root / "yunque", root / "hf", tasks


@pytest.mark.parametrize("k", [0, 5])
def test_same_prompts_loglikelihoods_and_accuracy_as_lm_eval(dirs, shared_data, k):
    yunque_dir, hf_dir, tasks = dirs
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"},
        tasks=["parity_hellaswag", "parity_arc_easy"], num_fewshot=k, limit=N, batch_size=16,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True,
        bootstrap_iters=0)
    model, tok = load_model(yunque_dir)
    lm = LocalLM(model, tok, batch_size=16)
    for name in ("hellaswag", "arc_easy"):
        task = load_task(name, shared_data)
        ours = evaluate(task, lm, num_fewshot=k, limit=N)
        theirs = sorted(out["samples"][f"parity_{name}"], key=lambda s: s["doc_id"])
        assert len(theirs) == ours["n"] == N
        prompts = [context(task, doc, shots) for _, doc, shots in iter_items(task, k, N, 1234)]
        for i, (item, s) in enumerate(zip(ours["items"], theirs)):
            assert s["arguments"][0][0] == prompts[i], f"{name} item {i}: prompts differ"
            lls = [float(r[0]) for r in s["filtered_resps"]]
            assert item["loglikelihoods"] == pytest.approx(lls, abs=1e-4), f"{name} item {i}"
            assert float(s["acc"]) == float(item["pred"] == item["gold"]), f"{name} item {i}: acc"
            assert float(s["acc_norm"]) == float(item["pred_norm"] == item["gold"]), f"{name} item {i}: acc_norm"
        for metric in ("acc", "acc_norm"):
            assert ours["metrics"][metric] == pytest.approx(out["results"][f"parity_{name}"][f"{metric},none"])


def test_same_rolling_perplexity_as_lm_eval(dirs, shared_data):
    yunque_dir, hf_dir, tasks = dirs
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu", "max_length": 64},
        tasks=["parity_shakespeare_ppl"], limit=12, batch_size=16,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True,
        bootstrap_iters=0)
    model, tok = load_model(yunque_dir)
    ours = evaluate(load_task("shakespeare_ppl", shared_data), LocalLM(model, tok, max_length=64), limit=12)
    theirs = sorted(out["samples"]["parity_shakespeare_ppl"], key=lambda s: s["doc_id"])
    assert [i["loglikelihood"] for i in ours["items"]] == pytest.approx(
        [float(s["filtered_resps"][0]) for s in theirs], abs=1e-3)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["metrics"][metric] == pytest.approx(out["results"]["parity_shakespeare_ppl"][f"{metric},none"],
                                                        rel=1e-5)


def test_same_gsm8k_generations_and_exact_match_as_lm_eval(dirs, shared_data):
    """Greedy generation through the engine against transformers' generate under lm-eval: 2-shot prompts from the
    train split, the same text until "Question:" (24 new tokens at most here), the same extracted answers."""
    import dataclasses

    yunque_dir, hf_dir, tasks = dirs
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"},
        tasks=["parity_gsm8k"], num_fewshot=2, limit=4, batch_size=4,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True,
        bootstrap_iters=0)
    model, tok = load_model(yunque_dir)
    task = load_task("gsm8k", shared_data)
    task = dataclasses.replace(task, spec={**task.spec, "generation_kwargs": {
        **task.spec["generation_kwargs"], "max_gen_toks": 24}})
    ours = evaluate(task, LocalLM(model, tok, batch_size=4), num_fewshot=2, limit=4)
    theirs = sorted((s for s in out["samples"]["parity_gsm8k"] if s["filter"] == "strict-match"),
                    key=lambda s: s["doc_id"])
    assert len(theirs) == 4
    prompts = [context(task, doc, shots) for _, doc, shots in iter_items(task, 2, 4, 1234)]
    for i, (item, s) in enumerate(zip(ours["items"], theirs)):
        assert s["arguments"][0][0] == prompts[i]
        assert item["response"] == s["resps"][0][0], f"item {i}"
    for name in ("strict-match", "flexible-extract"):
        assert ours["metrics"][f"exact_match,{name}"] == out["results"]["parity_gsm8k"][f"exact_match,{name}"]
