"""RULER's scoring: string_match_all and string_match_part, as percentages."""

from __future__ import annotations

import re
from collections.abc import Callable

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(prediction: str) -> str:
    """RULER's postprocess_pred: strip, and turn control characters into newlines."""
    return _CONTROL_CHARACTERS.sub("\n", prediction.strip()).strip()


def _found(prediction: str, references: list[str]) -> list[bool]:
    """For each reference, whether `prediction` (postprocessed) holds it, ignoring case."""
    if not references:
        raise ValueError("references must name at least one expected answer")
    prediction = postprocess_prediction(prediction).lower()
    return [reference.lower() in prediction for reference in references]


def string_match_all(prediction: str, references: list[str]) -> float:
    """Percentage (0-100) of `references` found in `prediction`, ignoring case."""
    found = _found(prediction, references)
    return 100.0 * sum(found) / len(found)


def string_match_part(prediction: str, references: list[str]) -> float:
    """100 if any of `references` is found in `prediction`, ignoring case, else 0 (RULER's QA
    metric: any one of a question's reference answers counts)."""
    return 100.0 * any(_found(prediction, references))


METRICS: dict[str, Callable[[str, list[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}
