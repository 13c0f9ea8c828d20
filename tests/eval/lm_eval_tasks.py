"""lm-evaluation-harness task YAMLs over ../shared/data, for the parity test and benchmarks/eval.py: offline
(datasets' json builder with local data_files), the same data yunque's built-in tasks read."""

import gzip
import json
from pathlib import Path


def write_lm_eval_tasks(shared_data: Path, root: Path, gsm8k_tokens: int = 24) -> Path:
    """Write parity_hellaswag, parity_arc_easy, parity_shakespeare_ppl and parity_gsm8k (lm-eval's gsm8k, with
    `gsm8k_tokens` new tokens at most) into root/tasks; returns that dir (for lm-eval's TaskManager(include_path=))."""
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    cache = root / "hf-datasets"
    # HellaSwag in Rowan/hellaswag's fields, split from the shared text form as yunque splits it (ctx_b: the
    # lower-case phrase after the last sentence end), so that lm-eval runs its own process_docs on it; all of it, as
    # it is also the few-shot pool
    lines = gzip.decompress((shared_data / "hellaswag/hellaswag_val_full.txt.gz").read_bytes()).decode().splitlines()
    with open(tasks / "hellaswag.jsonl", "w") as f:
        for i in range(0, len(lines), 6):
            label, _, ctx = lines[i].partition(": ")
            head, sep, tail = ctx.rpartition(". ")
            split = sep and tail[:1].islower() and not any(e in tail for e in (". ", "? ", "! "))
            a, b = (head + ".", tail) if split else (ctx, "")
            f.write(json.dumps({"activity_label": label, "ctx_a": a, "ctx_b": b, "label": lines[i + 1],
                                "endings": lines[i + 2:i + 6]}) + "\n")
    speeches = (shared_data / "tinyshakespeare.txt").read_text().split("\n\n")
    with open(tasks / "shakespeare.jsonl", "w") as f:
        for s in speeches:
            if s.strip():
                f.write(json.dumps({"page": s}) + "\n")
    (tasks / "parity_utils.py").write_text(
        "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n"
        "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results  # noqa: F401\n")
    (tasks / "parity_hellaswag.yaml").write_text(f"""
task: parity_hellaswag
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {tasks / 'hellaswag.jsonl'}}}, cache_dir: {cache}}}
output_type: multiple_choice
validation_split: validation
test_split: validation
fewshot_split: validation
process_docs: !function parity_utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: choices
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""")
    (tasks / "parity_arc_easy.yaml").write_text(f"""
task: parity_arc_easy
dataset_path: json
dataset_kwargs: {{data_files: {{test: {shared_data / 'arc/arc_easy.jsonl'}}}, cache_dir: {cache}}}
output_type: multiple_choice
test_split: test
fewshot_split: test
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: choices
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""")
    (tasks / "parity_shakespeare_ppl.yaml").write_text(f"""
task: parity_shakespeare_ppl
dataset_path: json
dataset_kwargs: {{data_files: {{test: {tasks / 'shakespeare.jsonl'}}}, cache_dir: {cache}}}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
process_results: !function parity_utils.process_results
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
""")
    (tasks / "parity_gsm8k.yaml").write_text(f"""
task: parity_gsm8k
dataset_path: json
dataset_kwargs:
  data_files: {{test: {shared_data / 'gsm8k/test.jsonl'}, train: {shared_data / 'gsm8k/train.jsonl.gz'}}}
  cache_dir: {cache}
output_type: generate_until
test_split: test
fewshot_split: train
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: false,
     regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]}}
generation_kwargs: {{until: ["Question:", "</s>", "<|im_end|>"], do_sample: false, temperature: 0.0,
                    max_gen_toks: {gsm8k_tokens}}}
filter_list:
  - name: strict-match
    filter: [{{function: regex, regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"}}, {{function: take_first}}]
  - name: flexible-extract
    filter: [{{function: regex, group_select: -1, regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"}},
             {{function: take_first}}]
""")
    return tasks
