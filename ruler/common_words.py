"""RULER's common words extraction (scripts/data/synthetic/common_words_extraction.py), offline.

A numbered list of words in which `num_cw` words appear `freq_cw` times each and the others
`freq_ucw` times; the model names the `num_cw` common ones. A solved example of the same task (40
words: 10 common x 10, the rest x 3) comes first. Below 4K tokens RULER uses fewer repeats: the
example has 20 words (x 3 and x 1) and the list's common words appear 6 times, the others once.
Words are wonderwords' nouns, adjectives and verbs, as RULER takes them.
"""

from __future__ import annotations

import random
from functools import cache, lru_cache

from .fitting import Draft
from .reference_random import shuffled_as_ruler
from .registry import Sampler, register_generator
from .sizing import ReferenceCounter, ReferenceSize, SizingTarget, reference_search, stepped_size
from .tokens import TokenCounter
from .values import _word_list

TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
# RULER's search step, in words.
STEP = 10
# Below this max_seq_length RULER's example and list repeat words less.
SHORT_CONTEXT = 4096
# (words, common repeats, other repeats) of the solved example, at and above SHORT_CONTEXT and below.
EXAMPLE, SHORT_EXAMPLE = (40, 10, 3), (20, 3, 1)
# (common repeats, other repeats) of the task's list below SHORT_CONTEXT.
SHORT_REPEATS = (6, 1)


@cache
def words() -> list[str]:
    """RULER's word list: wonderwords' nouns, adjectives and verbs, distinct, sorted."""
    return sorted(set(_word_list("nounlist") + _word_list("adjectivelist") + _word_list("verblist")))


@register_generator("cwe")
def cwe(set_rng: random.Random, target: SizingTarget, *, freq_cw: int = 30, freq_ucw: int = 3, num_cw: int = 10) -> Sampler:
    for name, value in (("freq_cw", freq_cw), ("freq_ucw", freq_ucw), ("num_cw", num_cw)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if freq_cw <= freq_ucw:
        raise ValueError(f"freq_cw={freq_cw} must exceed freq_ucw={freq_ucw}, or the common words tie with the others")
    if num_cw != 10:
        raise ValueError(f"num_cw={num_cw}: RULER's prompt asks for the 10 most common words, so num_cw must be 10")
    short = target.max_seq_length < SHORT_CONTEXT
    example_shape = SHORT_EXAMPLE if short else EXAMPLE
    repeats = SHORT_REPEATS if short else (freq_cw, freq_ucw)
    # RULER shuffles its word list with the run's seed before sampling from it. Words are kept
    # with the space they follow in the list, so that lists are joined, not built word by word.
    pool = [" " + word for word in shuffled_as_ruler(words(), target.seed)]
    template_head, _, template_tail = TEMPLATE.partition("{context}")

    def example(rng: random.Random) -> str:
        chosen = rng.sample(pool, example_shape[0])
        listed = _listed(chosen, num_cw, *example_shape[1:], target.seed)
        return TEMPLATE.format(context="".join(_numbered(listed))) + ANSWER_PREFIX + "".join(_numbered(chosen[:num_cw]))

    def draw(rng: random.Random, index: int) -> Draft:
        head = example(rng) + "\n" + template_head
        haystack = WordList(pool, rng, num_cw, *repeats, target.seed)
        return Draft(head, template_tail, ANSWER_PREFIX, haystack.common, haystack, min_units=2 * (num_cw * repeats[0] + repeats[1]))

    def reference_size() -> ReferenceSize:
        def search(counter: ReferenceCounter) -> ReferenceSize:
            rng = random.Random(target.seed)

            def tokens_at(size: int, threshold: int) -> int:
                head = example(rng) + "\n" + template_head
                chosen = rng.sample(pool, size)

                def prompt() -> tuple[str, list[str]]:
                    answers = "".join(_numbered(chosen[:num_cw]))
                    return head, _numbered(_listed(chosen, num_cw, *repeats, target.seed)) + [template_tail, ANSWER_PREFIX + " " + answers]

                return counter.tokens(size, threshold, prompt)

            units = stepped_size(tokens_at, target, STEP, most=len(pool))
            return ReferenceSize(units, STEP, target.max_seq_length - target.tokens_to_generate, target.max_seq_length)

        return reference_search(search, target.counter)

    return Sampler(draw, reference_size)


class WordList:
    """One sample's numbered list: the first `count` words of its own random order of the pool,
    the first `num_cw` of them repeated `common` times and the rest `other` times, in RULER's
    order for a list of that length.

    Units are the list's pieces ("1.", " apple", " 2.", ...; no separator), so that a number or
    a word is tokenized once however many lists hold it.
    """

    separator = ""

    def __init__(self, pool: list[str], rng: random.Random, num_cw: int, common: int, other: int, seed: int):
        self.pool, self.num_cw, self.repeats, self.seed = pool, num_cw, (common, other), seed
        self._rng = rng
        self._order: list[str] | None = None
        self.common = [word[1:] for word in self._words(num_cw)]

    def take(self, count: int) -> list[str]:
        if not self.num_cw < count <= len(self.pool):
            raise ValueError(f"a list of {count} words: RULER's lists hold more than {self.num_cw} and at most {len(self.pool)}")
        return _numbered(_listed(self._words(count), self.num_cw, *self.repeats, self.seed))

    def fill(self, budget: int, counter: TokenCounter) -> list[str]:
        """The longest list whose pieces fit `budget` tokens: each word more adds its repeats'
        words and numbers."""
        chosen = self._words(len(self.pool))
        common, other = self.repeats
        word_tokens = counter.pieces(chosen)
        length = self.num_cw * common + (len(chosen) - self.num_cw) * other
        number_tokens = counter.pieces(_numbered_marks(length))
        listed = self.num_cw * common
        total = sum(number_tokens[:listed]) + common * sum(word_tokens[: self.num_cw])
        count = self.num_cw
        while count < len(chosen):
            more = sum(number_tokens[listed : listed + other]) + other * word_tokens[count]
            if total + more > budget:
                break
            total, listed, count = total + more, listed + other, count + 1
        return self.take(count) if count > self.num_cw else []

    def _words(self, count: int) -> list[str]:
        """The first `count` words of this sample's order, drawn as far as asked so far."""
        if self._order is None or len(self._order) < count:
            # A fresh sample of `count` words; its first words are the ones drawn before.
            kept = self._order or []
            taken = set(kept)
            rest = [word for word in self.pool if word not in taken]
            self._order = kept + self._rng.sample(rest, count - len(kept))
        return self._order[:count]


def _listed(chosen: list[str], num_cw: int, common: int, other: int, seed: int) -> list[str]:
    """RULER's list: the first `num_cw` words `common` times, the rest `other` times, shuffled."""
    return shuffled_as_ruler(chosen[:num_cw] * common + chosen[num_cw:] * other, seed)


def _numbered(listed: list[str]) -> list[str]:
    """"1. apple 2. pear ..." as pieces: "1.", " apple", " 2.", " pear", ... (`listed` holds the
    words with their spaces)."""
    pieces = [""] * (2 * len(listed))
    pieces[0::2] = _numbered_marks(len(listed))
    pieces[1::2] = listed
    return pieces


@lru_cache(maxsize=8)
def _numbered_marks(length: int) -> tuple[str, ...]:
    return ("1.", *(f" {number}." for number in range(2, length + 1)))

