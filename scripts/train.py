"""Train a small stick-breaking or softmax+RoPE model on MQRAR or on offline text.

    python scripts/train.py --attention stickbreaking --data mqrar --num-pairs 64 --output runs/sb-64
    python scripts/train.py --attention softmax --data text --corpus aa-lcr --seq-length 2048 \\
        --layers 6 --hidden 384 --heads 6 --steps 4000 --output runs/softmax-text

The stick-breaking model is saved as OUTPUT/model in the format `sb_hf` loads, the softmax one as
a Llama checkpoint for lm-eval's `hf`. Rerunning the same command resumes from OUTPUT/train_state.pt.
"""

from __future__ import annotations

import argparse
import json

import torch

from sb_eval.ruler import mqrar
from sb_eval.tokenizer import byte_level_tokenizer, train_bpe_tokenizer, word_level_tokenizer
from sb_eval.training import (
    ATTENTION_KINDS, ModelSize, SequencePool, TokenWindows, TrainSettings, build_model, token_stream, train,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", choices=ATTENTION_KINDS, required=True)
    parser.add_argument("--data", choices=("mqrar", "text"), required=True)
    parser.add_argument("--output", required=True, help="run folder: log, resumable state, final model")
    parser.add_argument("--seq-length", type=int, default=768, help="training context in tokens")
    mqrar_args = parser.add_argument_group("MQRAR")
    mqrar_args.add_argument("--num-pairs", type=int, default=64, help="initial key-value pairs per sequence")
    mqrar_args.add_argument("--pool-size", type=int, default=20000, help="training sequences, reshuffled every epoch")
    text_args = parser.add_argument_group("text")
    text_args.add_argument("--corpus", default="aa-lcr", help="anything sb_eval.data.documents accepts")
    text_args.add_argument("--tokenizer", default="byte",
                           help="'byte', 'bpe:N' (a byte-level BPE of N ids learnt from the training documents) or a tokenizer folder")
    text_args.add_argument("--eval-documents", type=int, default=2, help="documents held out for evaluation")
    size = parser.add_argument_group("model")
    size.add_argument("--layers", type=int, default=2)
    size.add_argument("--hidden", type=int, default=256)
    size.add_argument("--heads", type=int, default=1)
    size.add_argument("--intermediate", type=int, default=None)
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
    """`count` MQRAR sequences (the seeds of training and evaluation sets differ)."""
    generated = mqrar.sequences(count, args.seq_length, args.num_pairs, seed=seed)
    return SequencePool([s.inputs for s in generated], [s.targets for s in generated], batch_size=args.batch_size, seed=seed)


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


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.data == "mqrar":
        tokenizer = word_level_tokenizer(mqrar.Vocabulary().symbols)
        train_source, eval_source = (mqrar_pool(args, count, seed) for count, seed in (
            (args.pool_size, args.seed), (args.eval_batches * args.batch_size, args.seed + 1_000_000),
        ))
        data = {"data": "mqrar", "num_pairs": args.num_pairs, "pool_size": args.pool_size}
    else:
        from sb_eval.data import documents

        try:
            texts = documents(args.corpus)
        except (OSError, ValueError) as error:  # a corpus not fetched yet, a bad path or source
            raise SystemExit(f"--corpus {args.corpus}: {error}") from None
        if len(texts) <= args.eval_documents:
            raise SystemExit(f"--corpus {args.corpus} has {len(texts)} documents; --eval-documents {args.eval_documents} leaves none to train on")
        held_out = args.eval_documents
        tokenizer = text_tokenizer(args.tokenizer, texts[held_out:])
        train_source = TokenWindows(token_stream(texts[held_out:], tokenizer), args.seq_length, args.batch_size, args.seed)
        eval_source = TokenWindows(token_stream(texts[:held_out], tokenizer), args.seq_length, args.batch_size, args.seed + 1)
        data = {"data": "text", "corpus": args.corpus, "tokenizer": args.tokenizer, "eval_documents": held_out}
    size = ModelSize(args.layers, args.hidden, args.heads, len(tokenizer), args.seq_length, args.intermediate)
    torch.manual_seed(args.seed)
    model = build_model(args.attention, size, tokenizer)
    settings = TrainSettings(
        steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, eval_every=args.eval_every,
        eval_batches=args.eval_batches, save_every=args.save_every, seed=args.seed,
        attention_backend=args.attention_backend,
        extra={"attention": args.attention, "seq_length": args.seq_length, "batch_size": args.batch_size, **data},
    )
    parameters = sum(p.numel() for p in model.parameters())
    print(json.dumps({"parameters": parameters, **settings.extra}))
    folder = train(model, tokenizer, train_source, eval_source, settings, args.output, device=args.device)
    print(f"saved {folder}")


if __name__ == "__main__":
    main()
