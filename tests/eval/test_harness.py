"""Running tasks: cached results equal recomputed ones, generation through the engine equals one prompt at a time,
lm-eval's answer extraction and metrics, rolling perplexity, last-word accuracy, chat prompts."""

import json
import math

import pytest
import torch

from yunque.config import preset
from yunque.eval.harness import ResultCache, apply_filters, evaluate, exact_match
from yunque.eval.lm import LocalLM
from yunque.eval.task import load_task
from yunque.model.gpt import GPT
from yunque.tokenizer.bpe import byte_tokenizer


class Counting:
    """An LM that counts the requests it is asked."""

    def __init__(self, lm):
        self.lm, self.name, self.fingerprint, self.asked = lm, lm.name, lm.fingerprint, 0

    def loglikelihood(self, pairs, progress=None):
        self.asked += len(pairs)
        return self.lm.loglikelihood(pairs, progress)

    def loglikelihood_rolling(self, texts):
        self.asked += len(texts)
        return self.lm.loglikelihood_rolling(texts)

    def generate(self, contexts, until, max_gen_toks):
        self.asked += len(contexts)
        return self.lm.generate(contexts, until, max_gen_toks)


@pytest.fixture(scope="module")
def lm():
    tok = byte_tokenizer()
    torch.manual_seed(0)
    return LocalLM(GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=1024)), tok, name="tiny", batch_size=8)


def test_a_cached_rerun_asks_nothing_and_equals_a_recomputed_run(lm, shared_data, tmp_path):
    task = load_task("arc_easy", shared_data)
    cache = ResultCache(tmp_path)
    first = Counting(lm)
    a = evaluate(task, first, limit=6, num_fewshot=1, cache=cache)
    assert first.asked == 6 * 4 and a["cached"] == 0
    again = Counting(lm)
    b = evaluate(task, again, limit=6, num_fewshot=1, cache=cache)
    assert again.asked == 0 and b["cached"] == 6
    fresh = evaluate(task, lm, limit=6, num_fewshot=1)  # no cache: recomputed
    assert a["items"] == b["items"] == fresh["items"] and b["metrics"] == fresh["metrics"]
    more = Counting(lm)
    c = evaluate(task, more, limit=8, num_fewshot=1, cache=cache)
    assert more.asked == 2 * 4 and c["items"][:6] == a["items"]  # only the new items
    other = Counting(lm)
    evaluate(task, other, limit=6, num_fewshot=2, cache=cache)  # other prompts: other keys
    assert other.asked == 6 * 4
    with open(next(tmp_path.rglob("*.jsonl")), "a") as f:
        f.write('{"key": "cut sho')  # a line cut by a kill is skipped
    assert evaluate(task, Counting(lm), limit=6, num_fewshot=1, cache=cache)["cached"] == 6


def test_multiple_choice_metrics_and_standard_errors(lm, shared_data):
    r = evaluate(load_task("hellaswag", shared_data), lm, limit=10)
    accs = [float(i["pred"] == i["gold"]) for i in r["items"]]
    mu = sum(accs) / 10
    assert r["metrics"]["acc"] == mu
    assert r["stderr"]["acc"] == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in accs) / 9 / 10))
    item = r["items"][0]
    task = load_task("hellaswag", shared_data)
    lens = [len(c) for c in task.choices(task.docs()[0])]
    norm = [ll / n for ll, n in zip(item["loglikelihoods"], lens)]
    assert item["pred_norm"] == norm.index(max(norm))


def test_limit_zero_is_refused(lm, shared_data):
    with pytest.raises(ValueError, match="--limit must be at least 1 item, got 0; leave it out"):
        evaluate(load_task("arc_easy", shared_data), lm, limit=0)


def _gen_task(tmp_path, until):
    rows = [{"q": f"{a} plus {b}", "a": f"#### {a + b}"} for a, b in [(1, 2), (10, 20), (3, 4), (5, 5), (7, 1)]]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "g.json").write_text(json.dumps({
        "task": "sums", "output_type": "generate_until", "data_files": {"test": "d.jsonl"}, "test_split": "test",
        "fewshot_split": "test", "doc_to_text": "Q: {{q}}\nA:", "doc_to_target": "{{a}}",
        "generation_kwargs": {"until": until, "max_gen_toks": 12},
        "filter_list": [{"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\d+)"},
                                                            {"function": "take_first"}]}]}))
    return load_task(str(tmp_path / "g.json"))


def test_generation_in_batches_equals_one_at_a_time(lm, tmp_path):
    task = _gen_task(tmp_path, ["\n\n", "Q:"])
    batched = evaluate(task, lm, num_fewshot=2)
    single = LocalLM(lm.model, lm.tokenizer, name="tiny", batch_size=1)
    alone = evaluate(task, single, num_fewshot=2)
    assert [i["response"] for i in batched["items"]] == [i["response"] for i in alone["items"]]
    # greedy through the engine, cut at the stop strings
    from yunque.config import SamplingParams
    from yunque.eval.task import context, iter_items

    prompts = [lm.tokenizer.encode(context(task, d, s), bos=True) for _, d, s in iter_items(task, 2, None, 1234)]
    params = SamplingParams(max_new_tokens=12, temperature=0, stop=("\n\n", "Q:"))
    want = [c.text for c in (lm.engine.generate_text([lm.tokenizer.decode(p[1:])], params)[0] for p in prompts)]
    assert [i["response"] for i in batched["items"]] == want
    assert batched["metrics"]["exact_match,strict-match"] == 0.0  # an untrained model writes no "#### n"


def test_gsm8k_extraction_and_exact_match_are_lm_evals():
    extraction = pytest.importorskip("lm_eval.filters.extraction")
    metrics = pytest.importorskip("lm_eval.api.metrics")
    task_kwargs = {"ignore_case": True, "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}
    strict = [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}]
    flexible = [{"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                {"function": "take_first"}]
    responses = [" She sells 9 eggs, making 9 * 2 = $18.\n#### 18", " The answer is 1,250 dollars.", " no idea",
                 " 3 + 4 = 7. So #### 7.", "#### -3"]
    target = "Some working <<1+1=2>>\n#### 1,250"
    for steps, kw in ((strict, {"regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}),
                      (flexible, {"regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)", "group_select": -1})):
        theirs = list(extraction.RegexFilter(**kw).apply([[r] for r in responses], None))
        ours = [apply_filters(r, steps) for r in responses]
        assert ours == [t[0] for t in theirs]
        for answer in ours:
            want = metrics.exact_match_hf_evaluate([answer], [target], **task_kwargs)["exact_match"]
            assert exact_match(answer, target, **task_kwargs) == want
    assert exact_match(apply_filters(" so 1,250.", flexible), target, **task_kwargs) == 1.0


def test_rolling_perplexity_metrics(lm, tmp_path):
    text = "To be, or not to be.\n\nThat is the question:\nwhether 'tis nobler.\n\n"
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "p.yaml").write_text("task: ppl\noutput_type: loglikelihood_rolling\ndata_files: {test: t.txt}\n"
                                     "format: text\ntext_separator: \"\\n\\n\"\nprocess_docs: text_page\n"
                                     "test_split: test\ndoc_to_target: text\n")
    r = evaluate(load_task(str(tmp_path / "p.yaml")), lm)
    docs = ["To be, or not to be.", "That is the question:\nwhether 'tis nobler."]
    lls = lm.loglikelihood_rolling(docs)
    n_bytes, words = sum(len(d.encode()) for d in docs), 6 + 7
    assert r["metrics"]["bits_per_byte"] == pytest.approx(-sum(lls) / n_bytes / math.log(2))
    assert r["metrics"]["word_perplexity"] == pytest.approx(math.exp(-sum(lls) / words))
    # lm-eval (0.4.13, HFLM.loglikelihood_rolling) encodes each document as transformers does, start token
    # included, and predicts all of it from the start token: one request when it fits the window
    from yunque.eval.scoring import score_one

    bos = lm.tokenizer.bos_id
    want = [score_one(lm.model, ([bos], lm.tokenizer.encode(d, bos=True)))[0] for d in docs]
    assert lls == pytest.approx(want, abs=1e-4)


def test_last_word_accuracy(lm, tmp_path):
    (tmp_path / "p.txt").write_text("the cat sat on the mat\n\nabc abc abc abc\n")
    (tmp_path / "l.yaml").write_text(
        "task: lw\noutput_type: loglikelihood\ndata_files: {test: p.txt}\nformat: text\n"
        "text_separator: \"\\n\\n\"\nprocess_docs: last_word\ntest_split: test\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n")
    r = evaluate(load_task(str(tmp_path / "l.yaml")), lm)
    scored = lm.loglikelihood([("the cat sat on the", " mat"), ("abc abc abc", " abc")])
    assert [i["loglikelihood"] for i in r["items"]] == pytest.approx([s[0] for s in scored])
    assert r["metrics"]["acc"] == sum(s[1] for s in scored) / 2
    assert r["metrics"]["perplexity"] == pytest.approx(math.exp(-(scored[0][0] + scored[1][0]) / 2))


def test_chat_prompts_go_through_the_chat_format(chatml, shared_data):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=chatml.tokenizer.vocab_size, max_seq_len=1024))
    chat_lm = LocalLM(model, chatml.tokenizer, fmt=chatml)
    task = load_task("arc_easy", shared_data)
    r = evaluate(task, chat_lm, num_fewshot=1, limit=2, chat=True)
    from yunque.eval.task import chat_messages, iter_items

    (_, doc, shots), _ = list(iter_items(task, 1, 2, 1234))
    messages = chat_messages(task, doc, shots)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    prompt = chatml.prompt(messages)
    assert chatml.tokenizer.decode(prompt).endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    want = [ll for ll, _ in chat_lm.loglikelihood([(messages, c) for c in task.choices(doc)])]  # no delimiter
    assert r["items"][0]["loglikelihoods"] == pytest.approx(want)
    with pytest.raises(ValueError, match="--chat does not apply"):
        evaluate(load_task("shakespeare_ppl", shared_data), chat_lm, limit=1, chat=True)


def test_benchmark_section_for_the_speedrun(shared_data):
    from yunque.eval.harness import benchmark_section

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256)).train()
    other = GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256))
    section = benchmark_section({"a": model, "b": other}, tok, tasks=("arc_easy", "lambada_shakespeare"), limit=5,
                                data_dir=shared_data, precision="fp32")
    assert model.training  # left as it was
    assert [(r["model"], r["task"]) for r in section["results"]] == [
        ("a", "arc_easy"), ("a", "lambada_shakespeare"), ("b", "arc_easy"), ("b", "lambada_shakespeare")]
    r = section["results"][0]
    assert r["n"] == 5 and set(r["metrics"]) == {"acc", "acc_norm"} and r["seconds"] > 0 and r["precision"] == "fp32"
    md = section["markdown"]
    assert md.startswith("## Benchmarks") and "### arc_easy (5 items, 0-shot)" in md and "| b |" in md
    assert r["metrics"] == evaluate(load_task("arc_easy", shared_data), LocalLM(model, tok), limit=5)["metrics"]
