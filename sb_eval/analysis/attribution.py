"""Where each head looked when it answered: the attention of the query that produces an answer
token, split over the spans of the prompt.

For the query that produces answer token s (step 0: the prompt's last position, whose output is
the first answer token; step s > 0: the position of answer token s - 1), per layer and head, its
attention weights A_i over the keys i fall into parts:

    needle n      the tokens of needle n (the statement that holds answer n)
    distractors   statements of the needles' form that hold no answer
    question      the question and answer prefix that end the prompt
    generated     the answer tokens generated before this step
    context       every other key (haystack, instructions; padding takes no weight)
    remainder     stick-breaking's unused stick, 1 - sum_i A_i; 0 for softmax

and the parts sum to 1. Stick-breaking models get them from the attention kernels (their
``key_spans``), softmax models from a blocked pass beside SDPA; no T x T matrix is made.

``AnswerSpanMass`` reaches the attention layers as the forward argument ``attention_spans``
(``collecting_span_mass`` adds it with a forward pre-hook, as attention statistics are added) and
records one batch of prompts at a time: ``start``, generate, ``finish``.

The rest of the module turns recorded parts into per-sample JSON and summaries:
a needle's head map m_n[l][h] is the largest mass head (l, h) put on needle n over the recorded
answer steps; its top mass is the largest entry of that map.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .attention_stats import observing_attention, softmax_weighted_sums

# The forward argument that carries an AnswerSpanMass to the attention layers.
SPAN_ARGUMENT = "attention_spans"
# Span indices of the parts other than needles; needle n is span FIRST_NEEDLE + n.
PARTS = ("context", "question", "generated", "distractors")
CONTEXT, QUESTION, GENERATED, DISTRACTORS = range(len(PARTS))
FIRST_NEEDLE = len(PARTS)
# The thresholds the summary also counts attended misses at, to show how much the split between
# retrieval and copying failures depends on the threshold chosen.
SENSITIVITY_THRESHOLDS = (0.01, 0.03, 0.1, 0.3)
# Masses are written with this many decimals: 1e-4 of a head's attention is below anything the
# summaries resolve, and whole runs stay a few megabytes.
DECIMALS = 4


def token_ranges(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The tokens [first, end) that overlap each character span [start, end) of a text, from the
    tokens' character offsets in order (a fast tokenizer's offset mapping; special tokens, (0, 0),
    overlap nothing). Raises ValueError for a span that no token overlaps."""
    token_starts = [start for start, _ in offsets]
    token_ends = [end for _, end in offsets]
    ranges = []
    for start, end in spans:
        first = bisect.bisect_right(token_ends, start)  # first token ending after the span starts
        stop = bisect.bisect_left(token_starts, end)  # first token starting at or after its end
        if first >= stop:
            raise ValueError(f"no token overlaps characters {start}..{end} of the text ({len(offsets)} tokens)")
        ranges.append((first, stop))
    return ranges


def prompt_span_indices(
    num_tokens: int,
    question: tuple[int, int],
    distractors: list[tuple[int, int]],
    needles: list[tuple[int, int]],
) -> list[int]:
    """The span index of each of a prompt's num_tokens tokens, given token ranges [first, end):
    needle n -> FIRST_NEEDLE + n, distractors -> DISTRACTORS, question -> QUESTION, the rest
    CONTEXT. Where ranges overlap (a token that straddles two), needles win, then distractors."""
    indices = [CONTEXT] * num_tokens
    for (first, end), index in [(question, QUESTION)] + [(r, DISTRACTORS) for r in distractors] + [
        (r, FIRST_NEEDLE + n) for n, r in enumerate(needles)
    ]:
        indices[first:end] = [index] * (end - first)
    return indices


@dataclass
class RecordedSpanMass:
    """What AnswerSpanMass recorded for one batch: mass [steps, B, L, H, spans] and remainder
    [steps, B, L, H], float32 on the CPU, for answer steps 0 .. steps - 1."""

    mass: torch.Tensor
    remainder: torch.Tensor


class AnswerSpanMass:
    """Per layer and head, the span mass of the query that produces each answer token, for one
    batch of left-padded prompts at a time (the prompts' keys are the first T of every pass)."""

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.num_layers, self.num_heads = num_layers, num_heads
        self._prompt_spans: torch.Tensor | None = None

    @property
    def num_spans(self) -> int:
        return self._num_spans

    def start(self, prompt_spans: torch.Tensor, num_spans: int, steps: int) -> None:
        """Records the coming forward passes of a batch: prompt_spans [B, T] is the span index of
        each key of the prompts (on the model's device; keys beyond T, the generated tokens, are
        GENERATED); a pass whose keys number T + s is answer step s, recorded for s < steps."""
        if self._prompt_spans is not None:
            raise RuntimeError("AnswerSpanMass.start: the previous batch was not finished")
        if prompt_spans.dim() != 2 or prompt_spans.dtype.is_floating_point:
            raise ValueError(f"prompt_spans must be a [batch, tokens] integer tensor, got {prompt_spans.dtype} {tuple(prompt_spans.shape)}")
        if num_spans <= GENERATED or steps < 1:
            raise ValueError(f"num_spans must exceed {GENERATED} and steps be at least 1, got {num_spans} and {steps}")
        self._prompt_spans, self._num_spans, self._steps = prompt_spans, num_spans, steps
        self._keys: torch.Tensor | None = None
        # step -> layer -> the layer's [B, H, spans] mass and [B, H] remainder (None: softmax),
        # kept as the attention returned them and stacked once the batch is finished: a copy per
        # layer and step would add two kernel launches to every layer of every decode step
        self._recorded: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor | None]]] = {}

    def key_spans(self, num_keys: int) -> torch.Tensor | None:
        """[B, num_keys] span indices of a pass's keys, or None when the pass is not recorded."""
        if self._prompt_spans is None:
            return None
        B, T = self._prompt_spans.shape
        step = num_keys - T
        if not 0 <= step < self._steps:
            return None
        if self._keys is None or self._keys.shape[1] != num_keys:
            generated = self._prompt_spans.new_full((B, step), GENERATED)
            self._keys = torch.cat([self._prompt_spans, generated], dim=1)
        return self._keys

    def record(self, layer: int, num_keys: int, span_mass: torch.Tensor, remainder: torch.Tensor | None) -> None:
        """One layer of the pass with num_keys keys: span_mass [B, H, spans] of its last query,
        remainder [B, H] (None for softmax: no remainder)."""
        step = num_keys - self._prompt_spans.shape[1]
        self._recorded.setdefault(step, {})[layer] = (span_mass, remainder)

    def record_softmax(self, layer: int, query: torch.Tensor, key: torch.Tensor, query_positions: torch.Tensor,
                       mask: torch.Tensor | None, scale: float) -> None:
        """One softmax layer call (sb_eval.analysis.attention_stats.stats_attention_forward):
        query [B, Hq, Tq, D], key [B, Hkv, Tk, D], the query positions [Tq] and visibility mask
        [B|1, 1, Tq, Tk] (or None: causal) that SDPA used; records its last query's span mass."""
        key_spans = self.key_spans(key.shape[2])
        if key_spans is None:
            return
        mass = softmax_span_mass(
            query[:, :, -1:], key, key_spans, self._num_spans, scale=scale,
            query_positions=query_positions[-1:], mask=None if mask is None else mask[:, :, -1:],
        )
        self.record(layer, key.shape[2], mass[:, :, 0], None)

    def finish(self) -> RecordedSpanMass:
        """The batch's recording, answer steps 0 .. n - 1 (a generation that stopped early
        records fewer than `steps`); then ready for the next batch's start."""
        recorded, self._recorded = self._recorded, {}
        B = self._prompt_spans.shape[0]
        self._prompt_spans = self._keys = None
        steps = sorted(recorded)
        if not steps:
            shape = (0, B, self.num_layers, self.num_heads)
            return RecordedSpanMass(torch.zeros(*shape, self._num_spans), torch.zeros(shape))
        if steps != list(range(len(steps))):
            raise RuntimeError(f"span mass was recorded at answer steps {steps}: the passes did not reach the prompt's end one token at a time")
        masses, remainders = [], []
        for step in steps:
            missing = sorted(set(range(self.num_layers)) - set(recorded[step]))
            if missing:
                raise RuntimeError(f"layers {missing} recorded no span mass at answer step {step}; their attention is not observed")
            layers = [recorded[step][layer] for layer in range(self.num_layers)]
            masses.append(torch.stack([mass.float() for mass, _ in layers]))
            remainders.append(torch.stack([torch.zeros_like(mass[..., 0]) if rem is None else rem.float() for mass, rem in layers]))
        # [steps, L, B, ...] -> [steps, B, L, ...]
        return RecordedSpanMass(torch.stack(masses).transpose(1, 2).cpu(), torch.stack(remainders).transpose(1, 2).cpu())


def softmax_span_mass(q: torch.Tensor, k: torch.Tensor, key_spans: torch.Tensor, num_spans: int, **options) -> torch.Tensor:
    """Softmax attention summed over the keys of each span: [B, Hq, Tq, num_spans].
    key_spans [B, Tk] span indices; options as softmax_weighted_sums (scale, query_positions,
    mask, block sizes)."""
    spans = torch.arange(num_spans, device=key_spans.device)

    def span_sums(p, j, keys):
        members = (key_spans[:, keys, None] == spans).to(p.dtype)  # [B, k, spans]
        return p @ members[:, None, None]

    return softmax_weighted_sums(q, k, span_sums, num_spans, **options)


@contextmanager
def collecting_span_mass(model: nn.Module) -> Iterator[AnswerSpanMass]:
    """An AnswerSpanMass that the attention of every forward pass of the model reports to while
    the block runs (a stick-breaking model through its kernels, a transformers softmax model
    through the statistics attention beside SDPA); afterwards the model is as it was."""
    config = model.config
    spans = AnswerSpanMass(config.num_hidden_layers, config.num_attention_heads)
    with observing_attention(model, SPAN_ARGUMENT, spans):
        yield spans


# ---------------------------------------------------------------------------------------------
# Per-sample JSON and summaries.


def answer_steps(mass: torch.Tensor, remainder: torch.Tensor, num_needles: int, tokens: list[str]) -> list[dict]:
    """One sample's recorded steps as JSON: mass [steps, L, H, spans], remainder [steps, L, H],
    tokens the answer token each step produced. Every part is [layer][head]; needle_masses is
    [layer][head][needle] and needle_mass its sum over the needles."""
    needles = mass[..., FIRST_NEEDLE : FIRST_NEEDLE + num_needles]
    steps = []
    for step, token in enumerate(tokens[: mass.shape[0]]):
        entry = {"token": token, "needle_mass": _rounded(needles[step].sum(-1)), "needle_masses": _rounded(needles[step])}
        entry.update({f"{part}_mass": _rounded(mass[step, :, :, index]) for index, part in enumerate(PARTS)})
        entry["remainder"] = _rounded(remainder[step])
        steps.append(entry)
    return steps


def _rounded(values: torch.Tensor) -> list:
    return torch.round(values.double(), decimals=DECIMALS).tolist()


def needle_head_maps(sample: dict) -> list[list[list[float]]]:
    """Per needle n, m_n[layer][head]: the largest mass the head put on the needle over the
    sample's recorded answer steps."""
    masses = torch.tensor([step["needle_masses"] for step in sample["steps"]], dtype=torch.float64)  # [steps, L, H, n]
    return masses.amax(0).permute(2, 0, 1).tolist()


def top_head(head_map: list[list[float]]) -> tuple[float, int, int]:
    """(mass, layer, head) of a [layer][head] map's largest entry, the first of equal ones."""
    best = (-math.inf, 0, 0)
    for layer, row in enumerate(head_map):
        for head, value in enumerate(row):
            if value > best[0]:
                best = (value, layer, head)
    return best


def needle_findings(sample: dict) -> list[dict]:
    """Per needle of a sample: its answer, whether the prediction holds it, its depth, its top
    mass and the head that gave it."""
    findings = []
    for needle, head_map in zip(sample["needles"], needle_head_maps(sample)):
        mass, layer, head = top_head(head_map)
        findings.append({**needle, "top_needle_mass": mass, "top_head": [layer, head], "head_map": head_map})
    return findings


def summarize(samples: list[dict], threshold: float) -> dict:
    """Counts and means over samples (sb_eval.harness.attribution's JSON). A needle is attended
    when its top mass is at least `threshold`. Returns

        by_point: per (task, length): samples, correct, mean score, needles, found, missed, and
                  missed needles that were attended / not attended, mean top needle mass, and the
                  mean share of the prompt's tokens a needle takes (what uniform attention would
                  give it)
        by_length: the same over every task of a length, and missed needles attended at each of
                   SENSITIVITY_THRESHOLDS
        heads: mean needle head map [layer][head] over every needle; top_heads per layer
        layers: per layer, the mean over needles of the layer's best head, for found and for
                missed needles, and how many missed needles the layer's best head attended
    """
    findings_of = {id(sample): needle_findings(sample) for sample in samples}  # each sample's, worked out once
    points: dict[tuple[str, int], list[dict]] = {}
    for sample in samples:
        points.setdefault((sample["task"], sample["length"]), []).append(sample)
    by_point = [{"task": task, "length": length, **_counts(group, threshold, findings_of)} for (task, length), group in sorted(points.items(), key=lambda item: (item[0][1], item[0][0]))]
    lengths: dict[int, list[dict]] = {}
    for sample in samples:
        lengths.setdefault(sample["length"], []).append(sample)
    by_length = [
        {"length": length, **_counts(group, threshold, findings_of), "missed_attended_at": _missed_attended_at(group, findings_of)}
        for length, group in sorted(lengths.items())
    ]
    findings = [finding for sample in samples for finding in findings_of[id(sample)]]
    return {"threshold": threshold, "by_point": by_point, "by_length": by_length, **_heads(findings, threshold)}


def _counts(samples: list[dict], threshold: float, findings_of: dict[int, list[dict]]) -> dict:
    """findings_of: needle_findings of each sample, by id()."""
    findings = [finding for sample in samples for finding in findings_of[id(sample)]]
    missed = [f for f in findings if not f["found"]]
    return {
        "samples": len(samples),
        "correct": sum(sample["correct"] for sample in samples),
        "mean_score": _mean([sample["score"] for sample in samples]),
        "needles": len(findings),
        "found": len(findings) - len(missed),
        "missed": len(missed),
        "missed_attended": sum(f["top_needle_mass"] >= threshold for f in missed),
        "missed_unattended": sum(f["top_needle_mass"] < threshold for f in missed),
        "found_attended": sum(f["top_needle_mass"] >= threshold for f in findings if f["found"]),
        "mean_top_needle_mass": _mean([f["top_needle_mass"] for f in findings]),
        "mean_needle_share": _mean([(f["tokens"][1] - f["tokens"][0]) / sample["prompt_tokens"]
                                    for sample in samples for f in sample["needles"]]),
    }


def _missed_attended_at(samples: list[dict], findings_of: dict[int, list[dict]]) -> dict[str, int]:
    """How many missed needles count as attended at each of SENSITIVITY_THRESHOLDS."""
    missed = [f["top_needle_mass"] for sample in samples for f in findings_of[id(sample)] if not f["found"]]
    return {str(threshold): sum(mass >= threshold for mass in missed) for threshold in SENSITIVITY_THRESHOLDS}


def _heads(findings: list[dict], threshold: float) -> dict:
    if not findings:
        return {"heads": [], "top_heads": [], "layers": []}
    maps = torch.tensor([f["head_map"] for f in findings], dtype=torch.float64)  # [needles, L, H]
    mean_map = maps.mean(0)
    found = torch.tensor([f["found"] for f in findings])
    best_per_layer = maps.amax(-1)  # [needles, L]
    layers = []
    for layer in range(maps.shape[1]):
        values, head = mean_map[layer].max(0)
        layers.append({
            "layer": layer,
            "top_head": int(head),
            "top_head_mean_needle_mass": round(float(values), DECIMALS),
            "found_mean": _mean(best_per_layer[found, layer].tolist()),
            "missed_mean": _mean(best_per_layer[~found, layer].tolist()),
            "missed_attended": int((best_per_layer[~found, layer] >= threshold).sum()),
        })
    order = sorted(((float(mean_map[l, h]), l, h) for l in range(maps.shape[1]) for h in range(maps.shape[2])), reverse=True)
    return {
        "heads": _rounded(mean_map),
        "top_heads": [{"layer": l, "head": h, "mean_needle_mass": round(v, DECIMALS)} for v, l, h in order[:5]],
        "layers": layers,
    }


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return round(sum(values) / len(values), DECIMALS) if values else None
