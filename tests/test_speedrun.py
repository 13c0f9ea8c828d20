"""The speedrun end to end on the built-in corpus, squeezed into a minute: report.md and report.json say how the
run went, what the machine should do, and when the model is not worth much yet."""

import json

import pytest

from yunque.config import SpeedrunConfig
from yunque.speedrun import LOW_MFU, main, short_reply_pairs, warnings


@pytest.fixture(scope="module")
def report(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("speedrun")
    r = main(SpeedrunConfig(out=str(out), minutes=0.1, sft_minutes=0.1, align_minutes=0.1, vocab_size=512,
                            heldout_questions=8, eval_tokens=16384, benchmark_items=24,
                            benchmark_data=str(shared_data), progress=False))
    return out, r


def test_the_report_tells_a_bad_run_from_a_good_one(report):
    out, r = report
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(r))
    md = (out / "report.md").read_text()
    # whether six seconds of pretraining leave the model undertrained depends on the machine's speed; either way
    # the report says what report.json says (the verdict itself is tested in test_budget and test_loop)
    assert bool(r["undertrained"]) == any("undertrained" in w for w in r["warnings"])
    assert ("**Warnings:**" in md) == bool(r["warnings"])
    assert all(w in md for w in r["warnings"])
    assert r["tokens_per_sec"] > 0 and r["machine_gflops"] > 0 and 0 < r["mfu"] < 1.5 and "% of this machine" in md
    assert r["steps"] > r["warmup_steps"] > 0 and "threads, torch" in r["machine"]
    for side in ("before", "after"):
        assert {"format_rate", "repetition_rate", "empty_rate", "mean_f1"} <= r["sft"][side].keys()
    assert "repeat themselves" in md
    al = r["align"]  # the alignment stage: its pairs, and the held-out figures before and after
    pairs = (out / "align_data" / "pairs.jsonl").read_text().splitlines()
    assert al["steps"] > 0 and al["rule"].startswith("1 to ") and al["pairs"] == len(pairs)
    for side in ("before", "after"):
        assert 0 <= al[side]["rule"] <= 1 and al[side]["perplexity"] > 1 and al[side]["kl"] >= 0
    assert al["before"]["kl"] < 1e-4 and "## Alignment: a preference stated only by pairs" in md
    assert (out / "aligned" / "model.safetensors").is_file()


def test_the_benchmark_section_scores_both_models_on_held_out_text_and_hellaswag(report):
    out, r = report
    bench = r["benchmark"]
    tasks = ["heldout_last_word", "heldout_cloze", "heldout_bpb", "hellaswag"]
    assert [(x["model"], x["task"]) for x in bench["results"]] == [
        (m, t) for m in ("pretrained", "fine-tuned") for t in tasks]
    assert all(x["n"] == 24 for x in bench["results"] if x["task"] != "heldout_bpb")
    by = {(x["model"], x["task"]): x["metrics"] for x in bench["results"]}
    # a model trained on the corpus knows its held-out text better than a uniform guess over its vocabulary
    assert by["pretrained", "heldout_bpb"]["bits_per_byte"] < 9 and 0 <= by["pretrained", "heldout_cloze"]["acc"] <= 1
    md = (out / "report.md").read_text()
    assert "## Benchmarks" in md and "### heldout_cloze (24 items, 0-shot)" in md and "| fine-tuned |" in md
    # the held-out tasks are files `yunque eval` reads as they are
    from yunque.eval.harness import evaluate
    from yunque.eval.lm import LocalLM
    from yunque.eval.task import load_task
    from yunque.modeldir import load_model

    model, tok = load_model(out)
    again = evaluate(load_task(str(out / "benchmark" / "heldout_cloze.yaml")),
                     LocalLM(model, tok, precision=bench["results"][0]["precision"]), limit=24)
    assert again["metrics"] == by["pretrained", "heldout_cloze"]


def test_the_plot_and_the_table_show_the_same_validation_figure(report):
    out, r = report
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["val_loss"] for x in records if "val_loss" in x][-1] == r["val_loss"]


def test_warnings_name_a_starved_run_and_a_degenerate_assistant():
    r = {"undertrained": None, "mfu": LOW_MFU / 2, "precision": "fp32", "achieved_gflops": 1.0,
         "machine_gflops": 100.0, "sft": {"after": {"repetition_rate": 0.9}}}
    found = warnings(r)
    assert "machine was busy" in found[0] and "repeat themselves" in found[1]
    r.update(mfu=0.5, sft={"after": {"repetition_rate": 0.0}})
    assert warnings(r) == []


def test_the_short_reply_pairs_also_prefer_a_short_reply_to_an_empty_one():
    questions = [f"q{i}" for i in range(40)]
    long = "a reply much longer than the rule allows, " * 4
    samples = [s for _ in questions for s in ["yes, that one", *[long] * 7]]  # 1 in 8 short: the limit stays 20
    limit, share, pairs = short_reply_pairs(questions, samples, 8, seed=0, empty_share=0.5)
    assert (limit, share) == (20, 1 / 8)
    against_empty = [p for p in pairs if p["rejected"] == ""]
    assert all(p["chosen"] == "yes, that one" for p in pairs)
    assert 10 <= len(against_empty) <= 30 and len(pairs) == 40 + len(against_empty)
    assert all(p["rejected"] for p in short_reply_pairs(questions, samples, 8, seed=0, empty_share=0.0)[2])


def test_replies_alike_in_length_get_a_longer_limit_that_makes_enough_pairs():
    questions = [f"q{i}" for i in range(40)]
    long = " ".join(["word"] * 10)
    # 5 questions have a 2-word reply (1.6% of samples), the other 35 two 4-word ones (22%): under 4 words only 5
    # questions have both a short and a long reply, too few; under 5 words every question has
    samples = [s for i in range(40) for s in (["two words", *[long] * 7] if i < 5 else ["a b c d"] * 2 + [long] * 6)]
    limit, share, pairs = short_reply_pairs(questions, samples, 8, seed=0, empty_share=0.0)
    assert (limit, share) == (5, 75 / 320) and len(pairs) == 40
    assert short_reply_pairs(questions, samples, 8, seed=0, most=0.15, empty_share=0.0)[0] == 4  # 22% is too many
