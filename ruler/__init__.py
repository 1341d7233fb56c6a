"""Offline, RULER-faithful synthetic long-context samples: haystacks, needles, templates, length
fitting and scoring. Imports only the standard library and wonderwords; the tokenizer is passed in.

    from sb_eval.ruler import generate
    samples = generate("niah_single_2", 4096, tokenizer, num_samples=500)

Also MQRAR, the paper's synthetic recall task, as token ids and as text: `sb_eval.ruler.mqrar`.
"""

from . import niah, variable_tracking  # noqa: F401  (register their generators)
from .corpora import MissingCorpusError, data_dir
from .fitting import Draft, Example
from .haystacks import NOISE, DistractorPool, PoolSample, RepeatedText, TextRun
from .registry import GENERATORS, TASKS, TaskSpec, generate, register_generator
from .scoring import string_match_all

__all__ = [
    "GENERATORS",
    "NOISE",
    "TASKS",
    "DistractorPool",
    "Draft",
    "Example",
    "MissingCorpusError",
    "PoolSample",
    "RepeatedText",
    "TaskSpec",
    "TextRun",
    "data_dir",
    "generate",
    "register_generator",
    "string_match_all",
]
