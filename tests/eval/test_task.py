"""Task specs: the built-in tasks read the shared data as lm-eval formulates them; bad specs and settings are
refused in one line that names the value and the fix."""

import json

import pytest

from yunque.eval.task import (
    FewshotSampler,
    builtin_tasks,
    context,
    hellaswag_doc,
    iter_items,
    load_task,
    parse_task,
    read_records,
)


def test_builtin_tasks_read_their_data(shared_data):
    assert {"hellaswag", "arc_easy", "gsm8k", "shakespeare_ppl", "lambada_shakespeare"} <= set(builtin_tasks())
    hs = load_task("hellaswag", shared_data)
    assert len(hs.docs()) == 10042
    first = hs.docs()[0]
    assert hs.text(first) == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalized
    assert hs.target(first) == 3 and len(hs.choices(first)) == 4
    arc = load_task("arc_easy", shared_data)
    assert arc.text(arc.docs()[0]).startswith("Question: Which statement") and arc.text(arc.docs()[0]).endswith(
        "?\nAnswer:")
    gsm = load_task("gsm8k", shared_data)
    assert gsm.default_fewshot == 5 and len(gsm.fewshot_docs()) == 7473
    assert gsm.target(gsm.docs()[0]).endswith("#### 18")
    lam = load_task("lambada_shakespeare", shared_data)
    doc = lam.docs()[0]
    assert lam.text(doc) + lam.target(doc) == doc["text"] and " " not in lam.target(doc)[1:]


def test_hellaswag_processing_is_lm_evals():
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    datasets = pytest.importorskip("datasets")
    raw = {"activity_label": "Making a cake", "ctx_a": "[header] How to bake. [title] Mix it.",
           "ctx_b": "then the Oven", "label": "2", "endings": ["a [step] b.", "c  d", "e", "f"]}
    theirs = utils.process_docs(datasets.Dataset.from_list([raw]))[0]
    ours = hellaswag_doc(raw)
    assert (ours["query"], ours["choices"], ours["gold"]) == (theirs["query"], theirs["choices"], theirs["gold"])
    text_form = hellaswag_doc({"query": "Cooking: He cuts it. then the man", "label": "0", "choices": list("abcd")})
    assert text_form["query"] == "Cooking: He cuts it. Then the man"


def test_fewshot_sampler_draws_as_lm_eval():
    samplers = pytest.importorskip("lm_eval.api.samplers")
    pool = [{"q": i} for i in range(30)]
    for exclude in (True, False):
        ours = FewshotSampler(pool, 1234, exclude)
        theirs = samplers.ContextSampler(pool, rnd=1234)
        for doc in pool[:12]:
            assert ours.sample(5, doc) == theirs.sample(5, eval_doc=doc if exclude else None)
    assert all(doc not in FewshotSampler(pool, 7, True).sample(29, doc) for doc in pool[:3])


def test_fewshot_context_is_lm_evals_layout(shared_data):
    arc = load_task("arc_easy", shared_data)
    (_, doc, shots), = list(iter_items(arc, 2, 1, 1234))
    ctx = context(arc, doc, shots)
    want = "".join(f"{ex['query']}\nAnswer: {ex['choices'][ex['gold']]}\n\n" for ex in shots) + doc["query"] + \
        "\nAnswer:"
    assert ctx == want
    # seeded: the same seed draws the same examples, another seed others
    assert [s for *_, s in iter_items(arc, 3, 5, 1)] == [s for *_, s in iter_items(arc, 3, 5, 1)]
    assert [s for *_, s in iter_items(arc, 3, 5, 1)] != [s for *_, s in iter_items(arc, 3, 5, 2)]


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown task 'hellaswg'; did you mean 'hellaswag'\? available: arc_easy"):
        load_task("hellaswg")


def test_task_file_with_a_missing_field_names_file_and_field(tmp_path):
    spec = {"task": "t", "output_type": "multiple_choice", "data_files": {"test": "d.jsonl"}, "test_split": "test",
            "doc_to_text": "{{q}}", "doc_to_target": "gold"}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=f"^{path}: doc_to_choice: missing"):
        load_task(str(path))
    (tmp_path / "u.yaml").write_text("task: u\noutput_type: multiple_choice\ntest_split: test\n")
    with pytest.raises(ValueError, match=r"u.yaml: data_files: missing"):
        load_task(str(tmp_path / "u.yaml"))
    (tmp_path / "v.yaml").write_text("task: v\noutput_type: generate\ndata_files: {test: x}\ntest_split: test\n")
    with pytest.raises(ValueError, match=r"v.yaml: output_type: 'generate' is not one of"):
        load_task(str(tmp_path / "v.yaml"))


def test_user_task_reads_data_beside_its_spec(tmp_path):
    (tmp_path / "d.csv").write_text("q,a,b,gold\nSky?,blue,green,0\nGrass?,blue,green,1\n")
    (tmp_path / "t.yaml").write_text(
        "task: colours\noutput_type: multiple_choice\ndata_files: {test: d.csv}\ntest_split: test\n"
        "doc_to_text: 'Q: {{q}}'\ndoc_to_target: '{{gold}}'\ndoc_to_choice: '{{[a, b]}}'\n")
    task = load_task(str(tmp_path / "t.yaml"))
    docs = task.docs()
    assert [task.text(d) for d in docs] == ["Q: Sky?", "Q: Grass?"]
    assert [task.choices(d) for d in docs] == [["blue", "green"]] * 2 and [task.target(d) for d in docs] == [0, 1]


def test_fewshot_larger_than_the_pool_is_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"q": str(i), "c": ["x", "y"], "g": 0}) + "\n"
                                              for i in range(4)))
    (tmp_path / "t.yaml").write_text(
        "task: small\noutput_type: multiple_choice\ndata_files: {test: d.jsonl}\ntest_split: test\n"
        "fewshot_split: test\ndoc_to_text: q\ndoc_to_target: g\ndoc_to_choice: c\n")
    task = load_task(str(tmp_path / "t.yaml"))
    assert len(list(iter_items(task, 3, None, 0))) == 4  # 4 items, each with the 3 others
    with pytest.raises(ValueError, match=r"--num-fewshot 4 but small's few-shot pool \(split 'test'\) has 3 "
                                         r"examples; pass --num-fewshot 3 or less"):
        list(iter_items(task, 4, None, 0))


def test_line_groups_collect_repeated_fields(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("ctx one\n1\na\nb\nctx two\n0\nc\nd\n")
    recs = read_records(path, {"format": "lines", "fields": ["query", "label", "choices", "choices"]})
    assert recs == [{"query": "ctx one", "label": "1", "choices": ["a", "b"]},
                    {"query": "ctx two", "label": "0", "choices": ["c", "d"]}]
    with pytest.raises(ValueError, match="not whole groups of 3"):
        read_records(path, {"format": "lines", "fields": ["a", "b", "c"]})


def test_parse_task_refuses_unknown_fields(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("task: t\noutput_type: loglikelihood_rolling\ndata_files: {test: a.txt}\ntest_split: test\n"
                    "doc_to_target: text\ndoc_to_txet: x\n")
    with pytest.raises(ValueError, match="t.yaml: doc_to_txet: unknown field"):
        parse_task(path, tmp_path)
