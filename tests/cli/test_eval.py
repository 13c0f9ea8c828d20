"""`yunque eval`: a report card for several models, a rerun read from the cache, and bad input in one line."""

import json
import shutil

from tests.cli.util import fails
from yunque.cli import main


def test_report_card_for_two_models_and_a_free_rerun(base, shared_data, tmp_path, capsys):
    other = tmp_path / "copy"
    shutil.copytree(base, other)
    argv = ["eval", str(base), str(other), "--tasks", "arc_easy,lambada_shakespeare", "--limit", "4",
            "--data-dir", str(shared_data), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "## arc_easy (4 items, 0-shot)" in out.out and "±" in out.out
    assert "0 cached" in out.err
    report = json.loads((tmp_path / "r/report.json").read_text())
    assert report["models"] == [base.name, "copy"] and report["tasks"] == ["arc_easy", "lambada_shakespeare"]
    # the same weights give the same numbers, and the copy was read from the cache (same fingerprint)
    a, b = (report["results"][m]["arc_easy"]["metrics"] for m in report["models"])
    assert a == b and "4 cached" in out.err
    assert (tmp_path / "r/report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| copy |" in (tmp_path / "r/report.md").read_text()
    assert main([*argv[:-2], "--json"]) == 0
    rerun = capsys.readouterr()
    assert rerun.err.count("4 cached") == 4
    assert json.loads(rerun.out)[0]["metrics"] == report["results"][base.name]["arc_easy"]["metrics"]


def test_bad_input_is_one_line(base, shared_data, tmp_path, capsys):
    data = ["--data-dir", str(shared_data), "--no-cache"]
    fails(capsys, ["eval", str(base), "--tasks", "hellaswg", *data], "unknown task 'hellaswg'",
          "did you mean 'hellaswag'?", "available: arc_easy, gsm8k, hellaswag")
    fails(capsys, ["eval", str(base), "--tasks", "arc_easy", "--limit", "0", *data],
          "--limit must be at least 1 item, got 0")
    spec = tmp_path / "t.yaml"
    spec.write_text("task: t\noutput_type: multiple_choice\ndata_files: {test: x.jsonl}\ntest_split: test\n"
                    "doc_to_text: q\ndoc_to_choice: c\n")
    fails(capsys, ["eval", str(base), "--tasks", str(spec), *data], f"{spec}: doc_to_target: missing")
    (tmp_path / "x.jsonl").write_text('{"q": "a", "c": ["b", "c"], "g": 0}\n{"q": "d", "c": ["e", "f"], "g": 1}\n')
    spec.write_text("task: t\noutput_type: multiple_choice\ndata_files: {test: x.jsonl}\ntest_split: test\n"
                    "fewshot_split: test\ndoc_to_text: q\ndoc_to_choice: c\ndoc_to_target: g\n")
    fails(capsys, ["eval", str(base), "--tasks", str(spec), "--num-fewshot", "5", *data],
          "--num-fewshot 5 but t's few-shot pool (split 'test') has 1 examples; pass --num-fewshot 1 or less")
    fails(capsys, ["eval", str(base), "--tasks", "arc_easy", "--chat", "--base-url", "http://127.0.0.1:9", *data],
          "--chat with --base-url is not supported")
