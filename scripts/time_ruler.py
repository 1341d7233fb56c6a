"""Time RULER sample generation: a fresh set, then the same set read back from the cache.

    python scripts/time_ruler.py [--tokenizer PATH] [--lengths 4096 16384 65536] [--num-samples 500] [--sizing ruler|fill]

Needs the essay corpus (`sb-eval data fetch essays`). Without --tokenizer it trains a GPT-2-style
byte-level BPE (50257 tokens) on the essays, as a stand-in for a real model's tokenizer.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sb_eval.ruler.corpora import essay_sentences
from sb_eval.ruler.generate import generate
from sb_eval.ruler.registry import TASKS
from sb_eval.ruler.sizing import SIZINGS


def essay_bpe(vocab_size: int = 50257) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    sentences = essay_sentences()
    paragraphs = (" ".join(sentences[i : i + 50]) for i in range(0, len(sentences), 50))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tokenizer.train_from_iterator(paragraphs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", model_max_length=1 << 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a local Hugging Face tokenizer folder (default: a BPE trained on the essays)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--tasks", nargs="+", default=[task for task, spec in TASKS.items() if spec.generator != "qa"],
                        choices=[task for task, spec in TASKS.items() if spec.generator != "qa"], help="RULER tasks (QA needs its data)")
    parser.add_argument("--sizing", default="ruler", choices=SIZINGS, help="RULER's haystack sizes (default) or filled contexts")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else essay_bpe()
    print(f"{'task':<16} {'length':>7} {'samples':>7} {'generate s':>10} {'from cache s':>12} {'fill':>6}")
    with tempfile.TemporaryDirectory() as cache_dir:
        for length in args.lengths:
            for task in args.tasks:
                started = time.perf_counter()
                samples = generate(task, length, tokenizer, args.num_samples, sizing=args.sizing, cache_dir=cache_dir)
                generated = time.perf_counter() - started
                started = time.perf_counter()
                generate(task, length, tokenizer, args.num_samples, sizing=args.sizing, cache_dir=cache_dir)
                reloaded = time.perf_counter() - started
                budget = TASKS[task].tokens_to_generate
                fill = min(sample["length"] + budget for sample in samples) / length  # of the least filled sample
                print(f"{task:<16} {length:>7} {len(samples):>7} {generated:>10.2f} {reloaded:>12.2f} {fill:>6.1%}", flush=True)


if __name__ == "__main__":
    main()
