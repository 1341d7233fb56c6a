"""Train a small stick-breaking or softmax+RoPE model on MQRAR, on offline text, or on offline text
mixed with retrieval practice (sb_eval.training.retrieval).

    python scripts/train.py --attention stickbreaking --data mqrar --num-pairs 64 --output runs/sb-64
    python scripts/train.py --attention softmax --data text --corpus aa-lcr --seq-length 2048 \\
        --layers 6 --hidden 384 --heads 6 --steps 4000 --output runs/softmax-text
    python scripts/train.py --attention stickbreaking --data mixture --tokenizer bpe:8192 \\
        --seq-length 2048 --layers 8 --hidden 384 --heads 6 --retrieval-rows 8 --output runs/sb-mix

The stick-breaking model is saved as OUTPUT/model in the format `sb_hf` loads, the softmax one as
a Llama checkpoint for lm-eval's `hf`. Rerunning the same command resumes from OUTPUT/train_state.pt.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from sb_eval.data.corpora import write_sentences
from sb_eval.data.documents import documents
from sb_eval.ruler import mqrar
from sb_eval.tokenization import byte_level_tokenizer, train_bpe_tokenizer, word_level_tokenizer
from sb_eval.training.retrieval import PackedSamples, RepeatedSegments, dense_recall_rows, retrieval_samples
from sb_eval.training.trainer import (
    ATTENTION_KINDS,
    ConcatenatedBatches,
    Curriculum,
    ModelSize,
    SequencePool,
    TokenWindows,
    TrainSettings,
    build_model,
    token_stream,
    train,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", choices=ATTENTION_KINDS, required=True)
    parser.add_argument("--data", choices=("mqrar", "text", "mixture"), required=True,
                        help="mixture: text windows and rows of packed retrieval samples in every batch")
    parser.add_argument("--output", required=True, help="run folder: log, resumable state, final model")
    parser.add_argument("--seq-length", type=int, default=768, help="training context in tokens")
    mqrar_args = parser.add_argument_group("MQRAR")
    mqrar_args.add_argument("--task", choices=mqrar.TASKS, default="mqrar",
                            help="mqrar: queries reassign their key and keys are asked again; mqar: each key asked once (the control)")
    mqrar_args.add_argument("--layout", choices=mqrar.LAYOUTS, default="power-law",
                            help="power-law: num_pairs queries among filler values (the paper's); dense: a query in every slot")
    mqrar_args.add_argument("--num-pairs", type=int, default=64, help="initial key-value pairs per sequence")
    mqrar_args.add_argument("--num-keys", type=int, default=mqrar.DEFAULT_NUM_KEYS, help="keys in the vocabulary")
    mqrar_args.add_argument("--num-values", type=int, default=mqrar.DEFAULT_NUM_VALUES, help="values in the vocabulary")
    mqrar_args.add_argument("--pool-size", type=int, default=20000, help="training sequences, reshuffled every epoch")
    text_args = parser.add_argument_group("text")
    text_args.add_argument("--corpus", default="aa-lcr", help="anything sb_eval.data.documents accepts")
    text_args.add_argument("--tokenizer", default="byte",
                           help="'byte', 'bpe:N' (a byte-level BPE of N ids learnt from the training documents) or a tokenizer folder")
    text_args.add_argument("--eval-documents", type=int, default=2, help="documents held out for evaluation")
    mixture = parser.add_argument_group("mixture")
    mixture.add_argument("--retrieval-rows", type=int, default=8, help="rows of each batch that hold retrieval samples")
    mixture.add_argument("--retrieval-lengths", default=None,
                         help="comma-separated sample lengths in tokens (default: quarters of --seq-length)")
    mixture.add_argument("--retrieval-samples", type=int, default=100, help="training samples per task variant and length")
    mixture.add_argument("--dense-recall-rows", type=int, default=0,
                         help="rows of each batch that hold dense recall practice (many needle questions a row)")
    mixture.add_argument("--dense-recall-pool", type=int, default=20000, help="dense recall rows made for training")
    mixture.add_argument("--repeat-rows", type=int, default=0,
                         help="rows of each batch that hold a random token segment repeated (copying practice)")
    mixture.add_argument("--repeat-segment-lengths", default="16,512", help="shortest,longest repeated segment in tokens")
    mixture.add_argument("--repeat-only-steps", type=int, default=0,
                         help="first steps whose whole batch is repeated segments, before the mixture")
    size = parser.add_argument_group("model")
    size.add_argument("--layers", type=int, default=2)
    size.add_argument("--hidden", type=int, default=256)
    size.add_argument("--heads", type=int, default=1)
    size.add_argument("--intermediate", type=int, default=None)
    size.add_argument("--logit-offsets", default=None,
                      help="stick-breaking only: FIRST,LAST initial attention logit offsets spread over each layer's heads "
                           "(query-key biases that let heads look far back from the start), e.g. --logit-offsets=0,-6")
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--steps", type=int, default=2000)
    optimisation.add_argument("--batch-size", type=int, default=64)
    optimisation.add_argument("--lr", type=float, default=1e-3)
    optimisation.add_argument("--warmup-steps", type=int, default=100)
    optimisation.add_argument("--eval-every", type=int, default=250)
    optimisation.add_argument("--eval-batches", type=int, default=8)
    optimisation.add_argument("--save-every", type=int, default=500)
    optimisation.add_argument("--seed", type=int, default=0)
    optimisation.add_argument("--attention-backend", default="auto", help="stick-breaking kernels backend")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def mqrar_pool(args: argparse.Namespace, count: int, seed: int) -> SequencePool:
    """`count` MQRAR (or MQAR) sequences (the seeds of training and evaluation sets differ)."""
    generated = mqrar.sequences(count, args.seq_length, args.num_pairs, mqrar_vocabulary(args), seed, args.task, args.layout)
    return SequencePool([s.inputs for s in generated], [s.targets for s in generated], batch_size=args.batch_size, seed=seed)


def mqrar_vocabulary(args: argparse.Namespace) -> mqrar.Vocabulary:
    try:
        return mqrar.Vocabulary(args.num_keys, args.num_values)
    except ValueError as error:
        raise SystemExit(f"--num-keys {args.num_keys} --num-values {args.num_values}: {error}") from None


def text_tokenizer(choice: str, training_texts: list[str]):
    """--tokenizer: 'byte', 'bpe:N' learnt from the training documents only, or a folder."""
    if choice == "byte":
        return byte_level_tokenizer()
    if choice.startswith("bpe:"):
        size = choice.removeprefix("bpe:")
        if not size.isdigit():
            raise SystemExit(f"--tokenizer {choice}: the BPE size must be a number of ids, e.g. bpe:8192")
        return train_bpe_tokenizer(training_texts, int(size))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(choice)


def text_data(args: argparse.Namespace):
    """(tokenizer, training source, evaluation source or sources, settings to record) for --data
    text and mixture. The first --eval-documents documents are held out from training, its
    tokenizer and its haystacks."""
    try:
        texts = documents(args.corpus)
    except (OSError, ValueError) as error:  # a corpus not fetched yet, a bad path or source
        raise SystemExit(f"--corpus {args.corpus}: {error}") from None
    if len(texts) <= args.eval_documents:
        raise SystemExit(f"--corpus {args.corpus} has {len(texts)} documents; --eval-documents {args.eval_documents} leaves none to train on")
    held_out, training = texts[:args.eval_documents], texts[args.eval_documents:]
    data = {"data": args.data, "corpus": args.corpus, "tokenizer": args.tokenizer, "eval_documents": len(held_out)}
    tokenizer = text_tokenizer(args.tokenizer, training)
    practice_rows = args.retrieval_rows + args.dense_recall_rows + args.repeat_rows
    text_rows = args.batch_size - (practice_rows if args.data == "mixture" else 0)
    if text_rows < 1:
        raise SystemExit(
            f"--retrieval-rows {args.retrieval_rows}, --dense-recall-rows {args.dense_recall_rows} and --repeat-rows "
            f"{args.repeat_rows} leave no text row of --batch-size {args.batch_size}"
        )
    train_text = TokenWindows(token_stream(training, tokenizer), args.seq_length, text_rows, args.seed)
    eval_text = TokenWindows(token_stream(held_out, tokenizer), args.seq_length, args.batch_size, args.seed + 1)
    if args.data == "text":
        return tokenizer, train_text, eval_text, data
    lengths = retrieval_lengths(args)
    sources = []
    for texts_, samples_per_set, seed, name in (
        (training, args.retrieval_samples, args.seed, "train"),
        (held_out, max(1, args.retrieval_samples // 10), args.seed + 1_000_000, "eval"),
    ):
        essay_file = write_sentences(texts_, f"{args.corpus} ({name} documents)", Path(args.output) / f"haystack_sentences_{name}.json")
        samples = retrieval_samples(tokenizer, essay_file, lengths, samples_per_set, seed)
        sources.append(PackedSamples(samples, args.seq_length, args.retrieval_rows, seed, tokenizer.eos_token_id))
    data.update(retrieval_rows=args.retrieval_rows, retrieval_lengths=lengths, retrieval_samples=args.retrieval_samples,
                retrieval_training_samples=len(sources[0].samples))
    train_sources = [train_text, sources[0]]
    eval_sources = {"text": eval_text, "retrieval": sources[1]}
    if args.dense_recall_rows:
        train_sources.append(dense_recall_rows(tokenizer, args.seq_length, args.dense_recall_pool, args.dense_recall_rows, args.seed))
        eval_sources["dense_recall"] = dense_recall_rows(
            tokenizer, args.seq_length, args.eval_batches * args.dense_recall_rows, args.dense_recall_rows, args.seed + 1_000_000
        )
        data.update(dense_recall_rows=args.dense_recall_rows, dense_recall_pool=args.dense_recall_pool)
    special = set(tokenizer.all_special_ids)
    token_ids = [token for token in range(len(tokenizer)) if token not in special]

    def repeats(rows: int, seed: int) -> RepeatedSegments:
        return RepeatedSegments(token_ids, args.seq_length, rows, seed, args.repeat_segment_lengths)

    if args.repeat_rows:
        train_sources.append(repeats(args.repeat_rows, args.seed))
        eval_sources["repeats"] = repeats(args.repeat_rows, args.seed + 1_000_000)
        data.update(repeat_rows=args.repeat_rows, repeat_segment_lengths=list(args.repeat_segment_lengths),
                    repeat_only_steps=args.repeat_only_steps)
    mixture_batches = ConcatenatedBatches(*train_sources)
    if args.repeat_only_steps:  # main() requires --repeat-rows with it
        return tokenizer, Curriculum(repeats(args.batch_size, args.seed + 2_000_000), args.repeat_only_steps, mixture_batches), eval_sources, data
    return tokenizer, mixture_batches, eval_sources, data


def retrieval_lengths(args: argparse.Namespace) -> list[int]:
    if args.retrieval_lengths is None:
        return [args.seq_length * quarter // 4 for quarter in range(1, 5)]
    try:
        lengths = [int(length) for length in args.retrieval_lengths.split(",")]
    except ValueError:
        raise SystemExit(f"--retrieval-lengths {args.retrieval_lengths}: expected comma-separated token counts") from None
    too_long = [length for length in lengths if not 0 < length <= args.seq_length]
    if too_long:
        raise SystemExit(f"--retrieval-lengths {too_long} must be between 1 and --seq-length {args.seq_length}")
    return lengths


def repeat_segment_lengths(args: argparse.Namespace) -> tuple[int, int]:
    try:
        shortest, longest = (int(size) for size in args.repeat_segment_lengths.split(","))
    except ValueError:
        raise SystemExit(f"--repeat-segment-lengths {args.repeat_segment_lengths}: expected two token counts, shortest,longest") from None
    if not 1 <= shortest <= longest < args.seq_length:
        raise SystemExit(f"--repeat-segment-lengths {args.repeat_segment_lengths}: need 1 <= shortest <= longest < --seq-length {args.seq_length}")
    return shortest, longest


def logit_offsets(args: argparse.Namespace) -> tuple[float, float] | None:
    if args.logit_offsets is None:
        return None
    if args.attention != "stickbreaking":
        raise SystemExit(f"--logit-offsets applies to --attention stickbreaking, not {args.attention}")
    try:
        first, last = (float(offset) for offset in args.logit_offsets.split(","))
    except ValueError:
        first = last = math.nan
    if not (math.isfinite(first) and math.isfinite(last)):
        raise SystemExit(f"--logit-offsets={args.logit_offsets}: expected two finite numbers, FIRST,LAST")
    return first, last


def main(argv=None) -> None:
    args = parse_args(argv)
    offsets = logit_offsets(args)  # flags checked before any data is made
    for flag in ("retrieval_rows", "dense_recall_rows", "repeat_rows", "repeat_only_steps"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if (args.repeat_rows or args.repeat_only_steps) and args.data != "mixture":
        raise SystemExit("--repeat-rows and --repeat-only-steps apply to --data mixture")
    if args.repeat_only_steps and not args.repeat_rows:
        raise SystemExit("--repeat-only-steps needs --repeat-rows (the repeated segments' settings and evaluation)")
    if args.repeat_rows:
        args.repeat_segment_lengths = repeat_segment_lengths(args)  # "16,512" -> (16, 512)
    if args.data == "mqrar":
        vocabulary = mqrar_vocabulary(args)
        try:
            mqrar.check_settings(args.seq_length, args.num_pairs, vocabulary, args.task, args.layout)
        except ValueError as error:
            raise SystemExit(f"--seq-length {args.seq_length} --num-pairs {args.num_pairs}: {error}") from None
        tokenizer = word_level_tokenizer(vocabulary.symbols)
        train_source, eval_source = (mqrar_pool(args, count, seed) for count, seed in (
            (args.pool_size, args.seed), (args.eval_batches * args.batch_size, args.seed + 1_000_000),
        ))
        data = {"data": "mqrar", "task": args.task, "layout": args.layout, "num_pairs": args.num_pairs,
                "num_keys": args.num_keys, "num_values": args.num_values, "pool_size": args.pool_size}
    else:
        tokenizer, train_source, eval_source, data = text_data(args)
    size = ModelSize(args.layers, args.hidden, args.heads, len(tokenizer), args.seq_length, args.intermediate)
    torch.manual_seed(args.seed)
    model = build_model(args.attention, size, tokenizer, offsets)
    settings = TrainSettings(
        steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, eval_every=args.eval_every,
        eval_batches=args.eval_batches, save_every=args.save_every, seed=args.seed,
        attention_backend=args.attention_backend,
        extra={"attention": args.attention, "seq_length": args.seq_length, "batch_size": args.batch_size,
               "logit_offsets": list(offsets) if offsets else None, **data},
    )
    parameters = sum(p.numel() for p in model.parameters())
    print(json.dumps({"parameters": parameters, **settings.extra}))
    folder = train(model, tokenizer, train_source, eval_source, settings, args.output, device=args.device)
    print(f"saved {folder}")


if __name__ == "__main__":
    main()
