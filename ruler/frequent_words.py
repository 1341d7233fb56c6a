"""RULER's frequent words extraction (scripts/data/synthetic/freq_words_extraction.py), offline.

A coded text of random 6-letter words whose counts follow a Zipf law: the word of rank k appears
int(n * k^-alpha / zeta(alpha)) times in a text of about n words, rank 1 being the noise "...".
The model names the three most frequent coded words (ranks 2 to 4). The vocabulary has
max_seq_length // 50 words, drawn afresh for each sample; the text is as long as fits
max_seq_length itself (RULER leaves the 50 generated tokens out of its sizing).
"""

from __future__ import annotations

import bisect
import math
import random
import string
from collections.abc import Callable
from itertools import chain, repeat

from .fitting import Draft
from .reference_random import shuffled_as_ruler
from .registry import Sampler, register_generator
from .sizing import ReferenceCounter, ReferenceSize, SizingTarget, reference_search
from .tokens import TokenCounter

TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
NOISE = "..."  # the rank-1 word
ANSWERS = slice(1, 4)  # ranks 2 to 4
# RULER's vocabulary size and search step, as fractions of max_seq_length.
VOCABULARY_DIVISOR, STEP_DIVISOR = 50, 32


@register_generator("fwe")
def fwe(set_rng: random.Random, target: SizingTarget, *, alpha: float = 2.0, coded_wordlen: int = 6, vocab_size: int = -1) -> Sampler:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 1:
        raise ValueError(f"alpha={alpha!r} must be a number above 1 (the Zipf law needs zeta(alpha) finite)")
    if not isinstance(coded_wordlen, int) or isinstance(coded_wordlen, bool) or coded_wordlen < 1:
        raise ValueError(f"coded_wordlen={coded_wordlen!r} must be a positive integer")
    vocabulary = target.max_seq_length // VOCABULARY_DIVISOR if vocab_size == -1 else vocab_size
    if not isinstance(vocabulary, int) or isinstance(vocabulary, bool) or vocabulary < 5:
        raise ValueError(f"vocab_size={vocab_size!r} must be -1 (max_seq_length // 50) or at least 5; max_seq_length={target.max_seq_length} gives {vocabulary}")
    shares = [rank ** -float(alpha) for rank in range(1, vocabulary + 1)]
    normaliser = zeta(float(alpha))
    step = target.max_seq_length // STEP_DIVISOR
    template_head, _, template_tail = TEMPLATE.partition(" {context}")

    def counts(size: int) -> list[int]:
        """How often each rank appears in a text of `size` words, as RULER computes it."""
        return [int(size * share / normaliser) for share in shares]

    def ruler_vocabulary(rng: random.Random) -> list[str]:
        """RULER's vocabulary, drawn as RULER draws it: distinct random words, sorted, then in its
        seed's order, "..." in place of the first."""
        drawn = ["".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)) for _ in range(vocabulary)]
        while len(set(drawn)) < vocabulary:
            drawn.append("".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)))
        return [NOISE] + shuffled_as_ruler(sorted(set(drawn)), target.seed)[1:]

    def vocabulary_from(rng: random.Random) -> list[str]:
        """"..." and distinct random words in a random order: the distribution of RULER's ranks,
        drawn a word per draw."""
        words: dict[str, None] = {}
        while len(words) < vocabulary - 1:
            number = rng.randrange(len(string.ascii_lowercase) ** coded_wordlen)
            letters = []
            for _ in range(coded_wordlen):
                number, letter = divmod(number, len(string.ascii_lowercase))
                letters.append(string.ascii_lowercase[letter])
            words["".join(letters)] = None
        return [NOISE, *words]

    def draw(rng: random.Random, index: int) -> Draft:
        ranked = vocabulary_from(rng)
        haystack = CodedText(ranked, counts, target.seed)
        return Draft(template_head, template_tail, ANSWER_PREFIX, ranked[ANSWERS], haystack, min_units=1)

    def reference_size() -> ReferenceSize:
        def search(counter: ReferenceCounter) -> ReferenceSize:
            text = CodedText(ruler_vocabulary(random.Random(target.seed)), counts, target.seed)

            def tokens(size: int) -> int:
                return counter.tokens(size, target.max_seq_length, lambda: (template_head, text.take(size) + [template_tail, ANSWER_PREFIX]))

            # RULER grows the text from max_seq_length // coded_wordlen words until it reaches
            # max_seq_length tokens, then steps back once.
            size = target.max_seq_length // coded_wordlen
            while tokens(size) < target.max_seq_length:
                size += step
            return ReferenceSize(size - step, step, target.max_seq_length, target.max_seq_length)

        return reference_search(search, target.counter)

    return Sampler(draw, reference_size)


class CodedText:
    """One sample's coded text: `counts(size)` copies of each ranked word, in RULER's order for a
    text of that length; the noise "..." is rank 1. Units are its words, each with the space
    before it (the prompt's head ends before the text's first space)."""

    separator = ""

    def __init__(self, ranked: list[str], counts: Callable[[int], list[int]], seed: int):
        self.ranked, self.counts, self.seed = ranked, counts, seed
        self.spaced = [" " + word for word in ranked]

    def take(self, count: int) -> list[str]:
        repeats = self.counts(count)
        if repeats[ANSWERS.stop - 1] <= repeats[ANSWERS.stop]:
            raise ValueError(
                f"a coded text of {count} words ties its third most frequent word with the fourth ({repeats[ANSWERS.stop]} "
                f"times each), so the answer is ambiguous; use a longer max_seq_length"
            )
        return shuffled_as_ruler(list(chain.from_iterable(map(repeat, self.spaced, repeats))), self.seed)

    def fill(self, budget: int, counter: TokenCounter) -> list[str]:
        """The longest text whose words fit `budget` tokens (word counts only grow with the size)."""
        word_tokens = counter.pieces(self.spaced)

        def tokens(size: int) -> int:
            return sum(times * tokens for times, tokens in zip(self.counts(size), word_tokens))

        # A text of `size` words holds at least share * size - len(ranked) of them, a token each.
        share = sum(self.counts(1 << 20)) / (1 << 20)
        sizes = range(self._unambiguous_size(), int((max(0, budget) + len(self.ranked)) / share) + 2)
        fitting = bisect.bisect_right(sizes, budget, key=tokens)
        return self.take(sizes[fitting - 1]) if fitting else []

    def _unambiguous_size(self) -> int:
        """The smallest size from which rank 4 always appears more often than rank 5."""
        shares = self.counts(1 << 20)
        return math.ceil((1 << 20) / (shares[ANSWERS.stop - 1] - shares[ANSWERS.stop]))


# B2, B4, ..., B12 over (2j)!: the Euler-Maclaurin coefficients.
_EULER_MACLAURIN = (1 / 12, -1 / 720, 1 / 30240, -1 / 1209600, 1 / 47900160, -691 / 1307674368000)


def zeta(s: float) -> float:
    """Riemann's zeta function for s > 1 (scipy.special.zeta, as RULER calls it): 19 terms summed,
    the tail by Euler-Maclaurin."""
    if s == 2.0:
        return math.pi**2 / 6  # scipy's value for RULER's alpha, to the last bit
    terms = 20
    total = math.fsum(k**-s for k in range(1, terms)) + terms ** (1 - s) / (s - 1) + terms**-s / 2
    rising, power = s, terms ** (-s - 1)
    for order, coefficient in enumerate(_EULER_MACLAURIN, start=1):
        total += coefficient * rising * power
        rising *= (s + 2 * order - 1) * (s + 2 * order)
        power /= terms**2
    return total
