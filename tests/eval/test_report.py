"""The report card: a table per task with "value ± standard error", JSON with every figure, a bar chart."""

import json

from yunque.eval.report import markdown, write_report


def result(model, task, kind, metrics, stderr):
    return {"model": model, "task": task, "output_type": kind, "metrics": metrics, "stderr": stderr, "n": 10,
            "num_fewshot": 5, "items": [{"i": 1}]}


RESULTS = [result("a", "arc_easy", "multiple_choice", {"acc": 0.5, "acc_norm": 0.6}, {"acc": 0.1, "acc_norm": 0.2}),
           result("b", "arc_easy", "multiple_choice", {"acc": 0.7, "acc_norm": 0.4}, {"acc": 0.1, "acc_norm": 0.1}),
           result("a", "ppl", "loglikelihood_rolling", {"bits_per_byte": 2.5, "word_perplexity": 123456.0},
                  {"bits_per_byte": None, "word_perplexity": None})]


def test_markdown_table_per_task():
    md = markdown(RESULTS, {"seed": 1234})
    assert "## arc_easy (10 items, 5-shot)" in md and "| model | acc | acc_norm |" in md
    assert "| a | 0.5000 ± 0.1000 | 0.6000 ± 0.2000 |" in md and "| b | 0.7000 ± 0.1000 | 0.4000 ± 0.1000 |" in md
    assert "| model | bits_per_byte ↓ | word_perplexity ↓ |" in md and "| a | 2.5000 | 1.235e+05 |" in md
    assert "Settings: seed 1234" in md


def test_write_report(tmp_path):
    md = write_report(RESULTS, tmp_path / "card", {"limit": 10})
    report = json.loads((tmp_path / "card/report.json").read_text())
    assert report["models"] == ["a", "b"] and report["tasks"] == ["arc_easy", "ppl"]
    assert report["results"]["b"]["arc_easy"]["stderr"]["acc_norm"] == 0.1 and "ppl" not in report["results"]["b"]
    assert md.read_text() == markdown(RESULTS, {"limit": 10})
    assert (tmp_path / "card/report.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "card/items-a-arc_easy.jsonl").read_text() == '{"i": 1}\n'
