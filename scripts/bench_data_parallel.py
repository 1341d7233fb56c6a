"""Data-parallel evaluation: `ruler_niah` on one GPU, then on N GPUs through `accelerate launch`,
with the same samples; checks the answers are identical and reports the speed-up.

    python scripts/bench_data_parallel.py --gpus 2 --length 16384 --num-samples 8 --output runs/dp

The model has the released 3B's shapes with random weights in bf16 (the byte-level tokenizer's
257-token vocabulary instead of 50304, so that every generated id decodes). Each run is a worker
process (`... bench_data_parallel.py worker`), alone or started by `accelerate launch`, that loads
`sb_hf` and builds the tasks, waits for every rank, then times lm-eval's `evaluate` alone: model
loading and sample generation are outside the timed part on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from sb_eval.files import write_atomically
from sb_eval.model.configuration import released_3b_config
from sb_eval.model.saving import write_random_checkpoint


def worker(args: argparse.Namespace) -> None:
    """One evaluation (a rank of it under accelerate); rank 0 writes OUTPUT/run.json."""
    import sb_eval_hook

    sb_eval_hook.install()  # sb-eval's tasks in every TaskManager, also in editable installs
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    from sb_eval.harness.stick_breaking_lm import StickBreakingLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = StickBreakingLM(pretrained=str(args.model), dtype="bfloat16", batch_size=1, device=device)
    metadata = {"max_seq_lengths": [args.length], "num_samples": args.num_samples, "pretrained": str(args.model)}
    task_dict = get_task_dict(args.tasks.split(","), TaskManager(metadata=metadata))
    if lm.world_size > 1:
        lm.accelerator.wait_for_everyone()
    started = time.perf_counter()
    results = evaluate(lm=lm, task_dict=task_dict, log_samples=True, bootstrap_iters=0)
    elapsed = time.perf_counter() - started
    if lm.rank == 0:
        answers = {
            f"{task}/{sample['doc_id']}": sample["filtered_resps"]
            for task, samples in results["samples"].items() for sample in samples
        }
        run = {"world_size": lm.world_size, "evaluate_s": elapsed, "results": results["results"], "answers": answers}
        write_atomically(args.output / "run.json", json.dumps(run, indent=1, default=str).encode())


def run_worker(launcher: list[str], args: argparse.Namespace, output: Path, gpus: str) -> dict:
    command = [
        *launcher, str(Path(__file__).resolve()), "worker", "--model", str(args.output / "model"),
        "--length", str(args.length), "--num-samples", str(args.num_samples), "--tasks", args.tasks,
        "--output", str(output),
    ]
    log = output.with_suffix(".log")
    (output / "run.json").unlink(missing_ok=True)  # a run that writes none must not report the last one's
    started = time.perf_counter()
    with log.open("w") as out:
        finished = subprocess.run(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpus}, stdout=out, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        sys.exit(f"{' '.join(command)} failed; the end of {log}:\n" + "\n".join(log.read_text().splitlines()[-30:]))
    run = json.loads((output / "run.json").read_text())
    run["wall_s"] = time.perf_counter() - started
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=("compare", "worker"), default="compare")
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--num-samples", type=int, default=8, help="per task (a multiple of --gpus splits evenly)")
    parser.add_argument("--tasks", default="ruler_niah")
    parser.add_argument("--model", type=Path, help="worker only: the checkpoint folder")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.mode == "worker":
        if args.model is None or not args.model.is_dir():
            sys.exit(f"worker: --model must be a checkpoint folder, got {args.model}")
        worker(args)
        return
    if not 2 <= args.gpus <= torch.cuda.device_count():
        sys.exit(f"--gpus must be between 2 and the {torch.cuda.device_count()} GPUs here, got {args.gpus}")
    args.output.mkdir(parents=True, exist_ok=True)
    if not (args.output / "model").is_dir():
        print("writing a random checkpoint with the released 3B's shapes", flush=True)
        config = released_3b_config(vocab_size=257, bos_token_id=256, eos_token_id=256, pad_token_id=256)
        write_random_checkpoint(args.output / "model", config, dtype=torch.bfloat16, device="cuda")

    single = run_worker([sys.executable], args, args.output / "single", "0")
    accelerate = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.gpus),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]
    parallel = run_worker(accelerate, args, args.output / "parallel", ",".join(map(str, range(args.gpus))))

    different = sorted(key for key in single["answers"] if parallel["answers"].get(key) != single["answers"][key])
    report = {
        "device": torch.cuda.get_device_name(0), "gpus": args.gpus, "length": args.length, "tasks": args.tasks,
        "samples": len(single["answers"]), "samples_in_parallel_run": len(parallel["answers"]),
        "parallel_world_size": parallel["world_size"],
        "identical_answers": not different and single["answers"].keys() == parallel["answers"].keys(),
        "different_answers": different[:10],
        "identical_metrics": single["results"] == parallel["results"],
        "single_evaluate_s": single["evaluate_s"], "parallel_evaluate_s": parallel["evaluate_s"],
        "speedup": single["evaluate_s"] / parallel["evaluate_s"],
        "efficiency": single["evaluate_s"] / parallel["evaluate_s"] / args.gpus,
        "single_wall_s": single["wall_s"], "parallel_wall_s": parallel["wall_s"],
        "torch": torch.__version__,
    }
    write_atomically(args.output / "report.json", json.dumps(report, indent=1).encode())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
