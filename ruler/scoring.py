"""RULER's scoring: string_match_all, as a percentage."""

from __future__ import annotations

import re

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(prediction: str) -> str:
    """RULER's postprocess_pred: strip, and turn control characters into newlines."""
    return _CONTROL_CHARACTERS.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Percentage (0-100) of `references` found in `prediction`, ignoring case."""
    if not references:
        raise ValueError("references must name at least one expected answer")
    prediction = postprocess_prediction(prediction).lower()
    return 100.0 * sum(reference.lower() in prediction for reference in references) / len(references)
