"""Local stand-ins shared by the RULER, data and task tests (no tests here): tokenizers that need
no download, a small essay corpus written into a temporary data directory, and small QA files in
the schemas of SQuAD v2.0's and HotpotQA's dev sets."""

from __future__ import annotations

import json
import random
from functools import cache
from importlib.resources import files
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sb_eval.data.corpora import write_sentences
from sb_eval.ruler.corpora import ESSAY_SENTENCES_FILE, ESSAY_TEXT_FILE
from sb_eval.tokenization import END_OF_TEXT


@cache
def _words() -> list[str]:
    text = (files("wonderwords") / "assets" / "nounlist.txt").read_text(encoding="utf-8")
    return text.split()


def standin_sentences(count: int, seed: int = 0) -> list[str]:
    """Sentences of 4-20 random English words, some ending in '?' or '!' like essay sentences."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_words()) for _ in range(rng.randint(4, 20))).capitalize() + rng.choice("...?!")
        for _ in range(count)
    ]


def write_standin_essays(data_dir: Path, count: int = 4000) -> list[str]:
    """An essay corpus in the layout `sb-eval data fetch essays` writes: the text as RULER ships it
    (paragraphs apart, whitespace to collapse) and its sentences; returns the sentences."""
    rng = random.Random(2)
    sentences = standin_sentences(count)
    text = "".join(sentence + rng.choice([" ", " ", " ", "\n\n", "  \n"]) for sentence in sentences)
    path = data_dir / ESSAY_TEXT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"text": text}), encoding="utf-8")
    write_sentences([text], "test stand-in", data_dir / ESSAY_SENTENCES_FILE)
    return json.loads((data_dir / ESSAY_SENTENCES_FILE).read_text(encoding="utf-8"))["sentences"]


def write_squad_standin(path: Path, articles: int = 40, seed: int = 5) -> Path:
    """A file in the schema of SQuAD v2.0's dev-v2.0.json: articles of paragraphs, each with a
    question answered by a span of it and one impossible question."""
    rng = random.Random(seed)
    data = []
    for article in range(articles):
        paragraphs = []
        for _ in range(rng.randint(2, 6)):
            context = " ".join(standin_sentences(rng.randint(3, 8), seed=rng.getrandbits(32)))
            answer = rng.choice(context.split(" ")[:-1])
            qas = [
                {"question": f"Which word comes {rng.randint(1, 9)}th?", "id": f"{article}-{len(paragraphs)}-a",
                 "answers": [{"text": answer, "answer_start": context.index(answer)}] * rng.randint(1, 3), "is_impossible": False},
                {"question": "What is not there?", "id": f"{article}-{len(paragraphs)}-b", "answers": [],
                 "plausible_answers": [{"text": answer, "answer_start": context.index(answer)}], "is_impossible": True},
            ]
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"Article_{article}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "v2.0", "data": data}), encoding="utf-8")
    return path


def write_hotpotqa_standin(path: Path, questions: int = 60, seed: int = 6) -> Path:
    """A file in the schema of HotpotQA's hotpot_dev_distractor_v1.json: questions with ten titled
    context paragraphs (lists of sentences), some paragraphs shared between questions."""
    rng = random.Random(seed)
    paragraphs = [(f"Title {number}", [s + " " for s in standin_sentences(rng.randint(2, 5), seed=rng.getrandbits(32))]) for number in range(300)]
    data = []
    for number in range(questions):
        context = rng.sample(paragraphs, 10)
        title, sentences = context[0]
        data.append({
            "_id": f"q{number}", "question": f"What does {title} say first?", "answer": sentences[0].split(" ")[0],
            "supporting_facts": [[title, 0], [context[1][0], 0]], "context": [[t, list(s)] for t, s in context],
            "type": "bridge", "level": "hard",
        })
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@cache
def merging_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (2000 tokens) trained on stand-in sentences and RULER's
    prompt words, so that its merges span whole words, numbers and parts of uuids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    rng = random.Random(1)
    corpus = standin_sentences(3000, seed=1) + [
        f"One of the special magic numbers for {rng.choice(_words())} is: {rng.randint(10**6, 10**7)}. "
        f"VAR {rng.choice(_words()).upper()} = {rng.randint(10000, 99999)} {rng.getrandbits(128):x}"
        for _ in range(2000)
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[END_OF_TEXT]
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, model_max_length=1 << 20)
