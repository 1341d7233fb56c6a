"""The task YAMLs of this folder, rendered from one table: which tasks exist, the lengths their
metrics are declared for, and each RULER task's generation budget (sb_eval.ruler.registry.TASKS,
RULER's own numbers). Edit the table here, then rewrite the files:

    python -m sb_eval.tasks.task_files

A test checks that the files in the folder are the rendering of this table.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sb_eval.files import write_atomically
from sb_eval.ruler.registry import TASKS

# The context lengths (tokens) that length-named metrics are declared for. lm-eval aggregates a
# declared metric as it says; an undeclared one it averages with a warning, and groups skip it.
METRIC_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)

# sb-eval's RULER tasks: lm-eval task name -> the RULER task it runs (sb_eval.ruler.registry.TASKS).
RULER_TASKS = {
    "sb_niah_single_1": "niah_single_1",
    "sb_niah_single_2": "niah_single_2",
    "sb_niah_single_3": "niah_single_3",
    "sb_niah_multikey_1": "niah_multikey_1",
    "sb_niah_multikey_2": "niah_multikey_2",
    "sb_niah_multikey_3": "niah_multikey_3",
    "sb_niah_multivalue": "niah_multivalue",
    "sb_niah_multiquery": "niah_multiquery",
    "sb_ruler_vt": "vt",
    "sb_ruler_cwe": "cwe",
    "sb_ruler_fwe": "fwe",
    "sb_ruler_qa_1": "qa_1",
    "sb_ruler_qa_2": "qa_2",
}
# Groups of RULER tasks, each averaged per length without weighting (as RULER averages its tasks).
RULER_GROUPS = {
    "ruler_niah": ("RULER's eight needle-in-a-haystack tasks", [name for name in RULER_TASKS if name.startswith("sb_niah_")]),
    "sb_ruler": ("RULER's 13 tasks, its average", list(RULER_TASKS)),
}
# The pair counts mqrar declares an accuracy for (acc_<pairs>): the paper's 32..192 and a few beyond.
MQRAR_METRIC_PAIRS = (16, 32, 64, 96, 128, 160, 192, 256, 512, 1024)

GENERATED = "# Rendered by sb_eval/tasks/task_files.py from its table; edit that, then run python -m sb_eval.tasks.task_files\n"
FOLDER = Path(__file__).resolve().parent


def render() -> dict[str, str]:
    """File name -> text of every task YAML of this folder."""
    files = {"_ruler_common.yaml": _ruler_common()}
    for task, ruler_task in RULER_TASKS.items():
        files[f"{task}.yaml"] = _ruler_task(task, ruler_task)
    for group, (what, members) in RULER_GROUPS.items():
        files[f"{group}.yaml"] = _ruler_group(group, what, members)
    files["sb_ppl.yaml"] = _sb_ppl()
    files["sb_wikitext.yaml"] = _sb_wikitext()
    files["mqrar.yaml"] = _mqrar()
    return files


def _ruler_common() -> str:
    metrics = "".join(f'  - {{metric: "{length}", aggregation: mean, higher_is_better: true}}\n' for length in METRIC_LENGTHS)
    return GENERATED + f"""# Shared by every RULER task here (no `task` key, so lm-eval does not list this file as a task).
output_type: generate_until
test_split: test
custom_dataset: !function sb_eval.tasks.ruler_tasks.custom_dataset
doc_to_text: !function sb_eval.tasks.ruler_tasks.doc_to_text
doc_to_target: outputs
gen_prefix: answer_prefix
target_delimiter: " "
process_results: !function sb_eval.tasks.ruler_tasks.process_results
# One metric per context length, named by the length: the task's RULER score (string_match_all, or
# string_match_part for QA, x 100) over that length's samples. A length not listed still gets its task-level metric (lm-eval averages it and warns),
# but groups only average the listed ones.
metric_list:
{metrics}metadata:
  version: 1.0
"""


def _ruler_task(task: str, ruler_task: str) -> str:
    return GENERATED + f"""include: _ruler_common.yaml
task: {task}
dataset_kwargs:
  ruler_task: {ruler_task}
# Greedy, with RULER's generation budget for the task.
generation_kwargs:
  do_sample: false
  temperature: 0.0
  max_gen_toks: {TASKS[ruler_task].tokens_to_generate}
  until: []
"""


def _ruler_group(group: str, what: str, members: list[str]) -> str:
    tasks = "".join(f"  - {member}\n" for member in members)
    metrics = "".join(f'  - {{metric: "{length}", weight_by_size: false}}\n' for length in METRIC_LENGTHS)
    return GENERATED + f"""# {what}; per length, the unweighted mean over tasks (as RULER averages its tasks).
group: {group}
task:
{tasks}aggregate_metric_list:
{metrics}metadata:
  version: 1.0
"""


def _sb_ppl() -> str:
    metrics = "".join(
        f"  - {{metric: nll_{length}, aggregation: mean, higher_is_better: false}}\n"
        f"  - {{metric: bits_per_byte_{length}, aggregation: bits_per_byte, higher_is_better: false}}\n"
        f"  - {{metric: windows_{length}, aggregation: !function sb_eval.tasks.perplexity.count, higher_is_better: true}}\n"
        for length in METRIC_LENGTHS
    )
    return GENERATED + f"""# Long-document perplexity at growing context lengths on identical targets: settings through
# --metadata (see sb_eval/tasks/perplexity.py); docs/tasks.md explains the windows.
task: sb_ppl
output_type: loglikelihood
test_split: test
custom_dataset: !function sb_eval.tasks.perplexity.sb_ppl_dataset
dataset_kwargs:
  # the lengths metric_list declares
  metric_lengths: [{", ".join(map(str, METRIC_LENGTHS))}]
doc_to_text: context
doc_to_target: continuation
# the continuation is the text right after the context, its leading whitespace included
target_delimiter: ""
process_results: !function sb_eval.tasks.perplexity.process_results
metric_list:
{metrics}metadata:
  version: 1.0
"""


def _sb_wikitext() -> str:
    metrics = "".join(
        f"  - {{metric: word_perplexity_{length}, aggregation: weighted_perplexity, higher_is_better: false}}\n"
        f"  - {{metric: byte_perplexity_{length}, aggregation: weighted_perplexity, higher_is_better: false}}\n"
        f"  - {{metric: bits_per_byte_{length}, aggregation: bits_per_byte, higher_is_better: false}}\n"
        f"  - {{metric: windows_{length}, aggregation: !function sb_eval.tasks.perplexity.total, higher_is_better: true}}\n"
        f"  - {{metric: approximate_windows_{length}, aggregation: !function sb_eval.tasks.perplexity.total, higher_is_better: false}}\n"
        f"  - {{metric: documents_longer_{length}, aggregation: !function sb_eval.tasks.perplexity.total, higher_is_better: true}}\n"
        f"  - {{metric: tokens_in_longer_{length}, aggregation: !function sb_eval.tasks.perplexity.share, higher_is_better: true}}\n"
        for length in METRIC_LENGTHS
    )
    return GENERATED + f"""# lm-eval's Wikitext perplexity (its rolling windows, detokenizer and metrics) at every length of
# max_seq_lengths in one run, on document-level Wikitext-2 loaded through `datasets`, or
# --metadata corpus; settings in sb_eval/tasks/perplexity.py, docs/tasks.md explains the windows.
# Named apart from lm-eval's own `wikitext`, which scores at the model's max_length alone.
task: sb_wikitext
# one document a sample, scored by a loglikelihood request per window of each length
class: !function sb_eval.tasks.perplexity.RollingWindowsTask
output_type: loglikelihood
test_split: test
custom_dataset: !function sb_eval.tasks.perplexity.wikitext_dataset
dataset_kwargs:
  # the lengths metric_list declares
  metric_lengths: [{", ".join(map(str, METRIC_LENGTHS))}]
doc_to_text: ""
doc_to_target: text
process_results: !function sb_eval.tasks.perplexity.wikitext_results
metric_list:
  - {{metric: longest_document, aggregation: !function sb_eval.tasks.perplexity.largest, higher_is_better: true}}
{metrics}metadata:
  version: 2.0
"""


def _mqrar() -> str:
    metrics = "".join(f"  - {{metric: acc_{pairs}, aggregation: mean, higher_is_better: true}}\n" for pairs in MQRAR_METRIC_PAIRS)
    return GENERATED + f"""# Multi-query repeated associative recall (paper section 5.1): greedy accuracy of the current
# value at sampled query keys. Settings through --metadata (see sb_eval/tasks/mqrar.py).
task: mqrar
output_type: loglikelihood
test_split: test
custom_dataset: !function sb_eval.tasks.mqrar.custom_dataset
doc_to_text: context
# lm-eval 0.4.13 adds no delimiter between a loglikelihood context and its target: the target
# carries its own leading space.
doc_to_target: !function sb_eval.tasks.mqrar.doc_to_target
target_delimiter: ""
process_results: !function sb_eval.tasks.mqrar.process_results
# "acc" over all pair counts, then one metric per pair count. A count not listed still gets its
# metric (lm-eval averages it and warns).
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
{metrics}metadata:
  version: 1.0
"""


def write(folder: Path = FOLDER) -> list[Path]:
    """Writes every rendered file into `folder`; returns their paths."""
    written = []
    for name, text in render().items():
        path = folder / name
        write_atomically(path, text.encode("utf-8"))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        print(f"wrote {path}", file=sys.stderr)
