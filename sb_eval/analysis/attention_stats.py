"""How far back each attention head looks: attention-weighted distance and attended mass.

For query position j with attention weights A_ij over keys i (positions in tokens):

    tokens_back_j = sum_i A_ij * (j - i)          (>= 0; the paper's sign is key - query, i.e. -tokens_back)
    mass_j        = sum_i A_ij                     (1 for softmax; 1 - rem_j for stick-breaking)

Stick-breaking leaves part of the stick, rem_j = 1 - mass_j, on no key. Three ways to place it
give three distances (``REMAINDER_CONVENTIONS``):

    ignore       tokens_back_j                     the remainder sits at distance 0
    renormalize  tokens_back_j / mass_j            the weights rescaled to sum to 1; queries with
                                                   mass 0 have no distribution and are left out
    farthest     tokens_back_j + rem_j * F_j       the remainder on the farthest visible key,
                                                   F_j = j - (first visible key)

For softmax models all three are the same. ``AttentionStatistics`` sums these per layer and head
over the query positions it counts (every non-padding position that sees at least one key, or
only the last position of each forward pass); it never holds a T x T matrix:
stick-breaking models hand it the kernel's fused per-query distance, and softmax models go through
``softmax_attention_distance``, a blocked online-softmax pass beside the model's own SDPA call.

``collecting_attention_statistics(model)`` hands an AttentionStatistics to the attention layers
of every forward pass as the forward argument ``attention_statistics`` (a forward pre-hook adds
it), which stick-breaking layers take as an argument and transformers passes on to the attention
function of a softmax model; nothing is attached to the layers.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from sb_eval.files import write_atomically

from .definitions import POSITIONS, REMAINDER_CONVENTIONS, SIGN_NOTE

logger = logging.getLogger(__name__)

# The name under which the softmax path is registered with transformers' attention interfaces.
STATS_ATTENTION = "sb_eval_stats"
# The forward argument that carries an AttentionStatistics to the attention layers.
STATISTICS_ARGUMENT = "attention_statistics"
# Upper bound on the elements of one [batch, heads, query block, key block] logit tile of the
# softmax path: 2^24 float32 values are 64 MiB.
SOFTMAX_TILE_ELEMENTS = 1 << 24
SOFTMAX_KEY_BLOCK = 1024


class UnsupportedArchitectureError(ValueError):
    """A model whose attention these statistics cannot observe; the message names the model's
    class and what is supported."""


def query_distances(
    tokens_back: torch.Tensor, mass: torch.Tensor, farthest_gap: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-query distance under each remainder convention.

    tokens_back, mass: [..., Tq] as defined above; farthest_gap: F_j broadcastable to them (0
    where a query sees no key), or None for softmax, where every convention is tokens_back.
    Returns ({convention: [..., Tq] float64}, has_mass [..., Tq] bool: where ``renormalize`` is
    defined).
    """
    tokens_back, mass = tokens_back.double(), mass.double()
    has_mass = mass > 0
    if farthest_gap is None:
        return {convention: tokens_back for convention in REMAINDER_CONVENTIONS}, has_mass
    farthest_gap = farthest_gap.double()
    # distance <= mass * F_j holds exactly; the clamp keeps a float32 remainder's rounding in
    # 1 - rem (~6e-8 absolute) from inflating the ratio of a nearly empty stick beyond F_j.
    renormalized = torch.where(has_mass, tokens_back / torch.where(has_mass, mass, 1.0), 0.0)
    renormalized = torch.minimum(renormalized, farthest_gap.expand_as(renormalized))
    return {
        "ignore": tokens_back,
        "renormalize": renormalized,
        "farthest": tokens_back + (1.0 - mass) * farthest_gap,
    }, has_mass


class AttentionStatistics:
    """Sums of per-query statistics per layer and head, kept on the model's device in float64.

    positions: "all" counts every non-padding query that sees at least one key; "last" counts
    only the last query row of each forward pass (the last position of a window).
    """

    def __init__(self, num_layers: int, num_heads: int, positions: str = "all") -> None:
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.num_layers, self.num_heads, self.positions = num_layers, num_heads, positions
        self.forward_passes = 0
        self._sums: dict[str, torch.Tensor] | None = None

    def query_rows(self, num_queries: int) -> slice:
        """The query rows of a [..., Tq] call that these statistics count."""
        return slice(num_queries - 1, num_queries) if self.positions == "last" else slice(0, num_queries)

    def record_stick_breaking(
        self,
        layer: int,
        tokens_back: torch.Tensor,
        rem: torch.Tensor,
        num_keys: int,
        key_mask: torch.Tensor | None,
        attend_current: bool,
    ) -> None:
        """One stick-breaking layer call: tokens_back and rem [B, H, Tq] as the kernel returns them
        (queries are the last Tq of num_keys positions); key_mask [B, num_keys] bool or None."""
        B, _, Tq = rem.shape
        rows = self.query_rows(Tq)
        device = rem.device
        j = torch.arange(num_keys - Tq, num_keys, device=device)[rows]  # absolute query positions
        if key_mask is None:
            first_key = torch.zeros(B, 1, dtype=torch.long, device=device)
            is_real = torch.ones(B, j.numel(), dtype=torch.bool, device=device)
        else:
            # Index of the first True; rows with no True get num_keys (sees nothing).
            first_key = torch.where(key_mask.any(1), key_mask.int().argmax(1), num_keys)[:, None]
            is_real = key_mask[:, j]
        sees_a_key = first_key <= j if attend_current else first_key < j
        farthest_gap = torch.where(sees_a_key, j - first_key, 0)  # [B, rows]
        self.record(
            layer,
            tokens_back[..., rows],
            1.0 - rem[..., rows].double(),
            farthest_gap[:, None, :],
            is_real & sees_a_key,
        )

    def record_softmax(self, layer: int, tokens_back: torch.Tensor, counted: torch.Tensor) -> None:
        """One softmax layer call on the rows of query_rows: tokens_back [B, H, rows]; counted
        [B, rows] bool. Mass is 1, so every remainder convention gives tokens_back."""
        self.record(layer, tokens_back, torch.ones_like(tokens_back, dtype=torch.float64), None, counted)

    def record(
        self,
        layer: int,
        tokens_back: torch.Tensor,
        mass: torch.Tensor,
        farthest_gap: torch.Tensor | None,
        counted: torch.Tensor,
    ) -> None:
        """Adds [B, H, rows] per-query statistics of the rows where counted [B, rows] is True;
        farthest_gap [B, 1, rows] or None (softmax: no remainder)."""
        if layer == 0:
            self.forward_passes += 1
        if self._sums is None:
            self._sums = self._zeros(mass.device)
        distances, has_mass = query_distances(tokens_back, mass, farthest_gap)
        weight = counted[:, None, :].double()  # [B, 1, rows]
        sums = self._sums
        sums["queries"][layer] += weight.sum((0, 2)).expand(self.num_heads)
        sums["mass"][layer] += (mass * weight).sum((0, 2))
        for convention, values in distances.items():
            # where(): a query left out of renormalize carries 0 * anything, never 0 * nan
            sums[convention][layer] += torch.where(weight > 0, values, 0.0).sum((0, 2))
        sums["renormalize_queries"][layer] += (has_mass * weight).sum((0, 2))

    def _zeros(self, device) -> dict[str, torch.Tensor]:
        return {
            name: torch.zeros(self.num_layers, self.num_heads, dtype=torch.float64, device=device)
            for name in ("queries", "mass", "renormalize_queries", *REMAINDER_CONVENTIONS)
        }

    def to_dict(self) -> dict:
        """JSON-ready sums, counts and means: [layer][head] lists, plus whole-model means pooled
        over every counted (query, head, layer). A head with no counted query has mean null."""
        sums = {name: values.cpu() for name, values in (self._sums or self._zeros("cpu")).items()}

        def mean(total: torch.Tensor, count: torch.Tensor):
            return [[_ratio(t, c) for t, c in zip(row_t.tolist(), row_c.tolist())] for row_t, row_c in zip(total, count)]

        queries, renormalize_queries = sums["queries"], sums["renormalize_queries"]
        count_of = {"ignore": queries, "renormalize": renormalize_queries, "farthest": queries}
        return {
            "layers": self.num_layers,
            "heads": self.num_heads,
            "positions": self.positions,
            "forward_passes": self.forward_passes,
            "sign": SIGN_NOTE,
            "queries": queries.long().tolist(),
            "mass": {"sum": sums["mass"].tolist(), "mean": mean(sums["mass"], queries)},
            "tokens_back": {
                convention: {
                    "sum": sums[convention].tolist(),
                    "queries": count_of[convention].long().tolist(),
                    "mean": mean(sums[convention], count_of[convention]),
                }
                for convention in REMAINDER_CONVENTIONS
            },
            "model_mean": {
                "mass": _ratio(sums["mass"].sum().item(), queries.sum().item()),
                "tokens_back": {
                    convention: _ratio(sums[convention].sum().item(), count_of[convention].sum().item())
                    for convention in REMAINDER_CONVENTIONS
                },
            },
        }


def _ratio(total: float, count: float) -> float | None:
    return total / count if count > 0 else None


# ---------------------------------------------------------------------------------------------
# Softmax models: blocked online softmax beside transformers' SDPA attention.


def softmax_attention_distance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    query_positions: torch.Tensor,
    mask: torch.Tensor | None = None,
    key_block: int = SOFTMAX_KEY_BLOCK,
    query_block: int | None = None,
) -> torch.Tensor:
    """sum_i p_ij * (j - i) of softmax attention, without the [Tq, Tk] matrix.

    Arguments as softmax_weighted_sums. Returns [B, Hq, Tq] in tokens; 0 for a query that sees
    no key.
    """

    def weighted_gaps(p, j, keys):
        gap = (j[:, None] - keys[None, :]).to(p.dtype)  # [q, k]
        return (p * gap).sum(-1, keepdim=True)

    return softmax_weighted_sums(
        q, k, weighted_gaps, 1, scale=scale, query_positions=query_positions, mask=mask,
        key_block=key_block, query_block=query_block,
    )[..., 0]


def softmax_weighted_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    block_sums: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    num_values: int,
    *,
    scale: float,
    query_positions: torch.Tensor,
    mask: torch.Tensor | None = None,
    key_block: int = SOFTMAX_KEY_BLOCK,
    query_block: int | None = None,
) -> torch.Tensor:
    """sum_i p_ij * f(i, j) of softmax attention p, for num_values quantities f, without the
    [Tq, Tk] matrix: blocks of query_block x key_block with a running maximum and normaliser
    (float32; float64 for float64 inputs).

    q: [B, Hq, Tq, D]; k: [B, Hkv, Tk, D] with Hq a multiple of Hkv; query_positions: [Tq]
    positions j of the query rows among the keys; mask: bool [B or 1, 1, Tq, Tk], True where a
    query sees a key, or None for causal (key i visible to query j when i <= j).
    block_sums(p, j, keys): for the unnormalised weights p [B, Hkv, group, q, k] of one block,
    the query positions j [q] and the key positions keys [k], the block's sums
    [B, Hkv, group, q, num_values]. Returns [B, Hq, Tq, num_values]; 0 for a query that sees no
    key.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    if query_block is None:
        query_block = max(1, SOFTMAX_TILE_ELEMENTS // (B * Hq * min(key_block, Tk)))
    q_grouped = q.reshape(B, Hkv, group, Tq, D)
    neg_inf = torch.tensor(float("-inf"), dtype=compute, device=q.device)
    sum_blocks = []
    for q_start in range(0, Tq, query_block):
        q_end = min(q_start + query_block, Tq)
        j = query_positions[q_start:q_end]
        qb = q_grouped[:, :, :, q_start:q_end].to(compute) * scale
        shape = (B, Hkv, group, q_end - q_start)
        running_max = torch.full(shape, float("-inf"), dtype=compute, device=q.device)
        normaliser = torch.zeros(shape, dtype=compute, device=q.device)
        sums = torch.zeros(*shape, num_values, dtype=compute, device=q.device)
        last_key = Tk if mask is not None else min(Tk, int(j.max()) + 1)
        for k_start in range(0, last_key, key_block):
            k_end = min(k_start + key_block, last_key)
            i = torch.arange(k_start, k_end, device=q.device)
            if mask is None:
                visible = (i[None, :] <= j[:, None])[None, None, None]
            else:
                visible = mask[:, :, q_start:q_end, k_start:k_end][:, :, None]  # [B|1, 1, 1, q, k]
            logits = qb @ k[:, :, None, k_start:k_end].to(compute).transpose(-1, -2)
            logits = torch.where(visible, logits, neg_inf)
            new_max = torch.maximum(running_max, logits.amax(-1))
            # rows that have seen no key yet keep -inf; shift them by 0 so no inf - inf appears
            shift = torch.where(torch.isfinite(new_max), new_max, 0.0)
            correction = torch.exp(running_max - shift)
            p = torch.exp(logits - shift[..., None])
            normaliser = normaliser * correction + p.sum(-1)
            sums = sums * correction[..., None] + block_sums(p, j, i)
            running_max = new_max
        normalised = sums / normaliser.clamp_min(torch.finfo(compute).tiny)[..., None]
        sum_blocks.append(torch.where(normaliser[..., None] > 0, normalised, 0.0))
    return torch.cat(sum_blocks, dim=-2).reshape(B, Hq, Tq, num_values)


def softmax_query_layout(
    num_queries: int, num_keys: int, attention_mask: torch.Tensor | None, is_causal: bool, device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which keys SDPA lets each query see, as transformers calls it: (query positions [Tq],
    bool mask [B|1, 1, Tq, Tk], or None for causal: key i visible to query j when i <= j).

    Mirrors sdpa_attention_forward: with no mask and Tq > 1 it runs is_causal, which aligns the
    queries with the first keys (keys beyond Tq, as in an empty static cache, are cut); with no
    mask and Tq = 1 the query sees every key; with a mask the queries are the last Tq positions
    (no cache, or transformers' DynamicCache).
    """
    if attention_mask is None:
        if num_queries == 1:
            return torch.tensor([num_keys - 1], device=device), None
        if not is_causal:
            raise UnsupportedArchitectureError("attention statistics cover causal decoders; this attention is not causal")
        return torch.arange(num_queries, device=device), None
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        raise ValueError(
            "attention statistics need the boolean [batch, 1, queries, keys] mask of transformers' "
            f"sdpa_mask; got {attention_mask.dtype} {tuple(attention_mask.shape)}"
        )
    return torch.arange(num_keys - num_queries, num_keys, device=device), attention_mask


def stats_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    attention_statistics: AttentionStatistics | None = None,
    attention_spans=None,
    **kwargs,
):
    """transformers' SDPA attention, unchanged, plus what the forward pass asks to observe: the
    statistics of this call recorded into `attention_statistics`, and the span mass of its last
    query into `attention_spans` (an sb_eval.analysis.attribution.AnswerSpanMass). query
    [B, Hq, Tq, D] and key [B, Hkv, Tk, D] arrive with RoPE applied and the cache appended, as the
    model attends with them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    if attention_statistics is None and attention_spans is None:
        return output
    if kwargs.get("s_aux") is not None:
        raise UnsupportedArchitectureError(
            f"{type(module).__name__}: attention statistics cover plain softmax; this model has attention sinks (s_aux)"
        )
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    Tq, Tk = query.shape[2], key.shape[2]
    positions, mask = softmax_query_layout(Tq, Tk, attention_mask, is_causal, query.device)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if attention_spans is not None:
        attention_spans.record_softmax(module.layer_idx, query, key, positions, mask, scale)
    statistics = attention_statistics
    if statistics is not None:
        rows = statistics.query_rows(Tq)
        positions = positions[rows]
        mask = None if mask is None else mask[:, :, rows]
        distance = softmax_attention_distance(
            query[:, :, rows], key, scale=scale, query_positions=positions, mask=mask
        )
        B = query.shape[0]
        if mask is None:
            counted = torch.ones(B, positions.numel(), dtype=torch.bool, device=query.device)
        else:
            # A padding query's own position is masked; a real query always sees itself.
            own = mask[:, 0, torch.arange(positions.numel(), device=query.device), positions]
            counted = own.expand(B, -1)
        statistics.record_softmax(module.layer_idx, distance, counted)
    return output


def register_stats_attention() -> None:
    """Registers the statistics attention with transformers, with SDPA's mask builder: without a
    mask function registered under the same name, transformers passes no mask at all."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(STATS_ATTENTION, stats_attention_forward)
    AttentionMaskInterface.register(STATS_ATTENTION, sdpa_mask)


# ---------------------------------------------------------------------------------------------
# Switching collection on and off.


@contextmanager
def collecting_attention_statistics(model: nn.Module, positions: str = "all") -> Iterator[AttentionStatistics]:
    """Collects, while the block runs, the statistics of every forward pass of the model's decoder
    (model.base_model): a stick-breaking model's from the kernel's fused statistics, a transformers
    softmax model's (which attends through SDPA meanwhile, its outputs unchanged) from the blocked
    pass. Yields the AttentionStatistics; afterwards the model is as it was (a softmax model back
    on the attention it had)."""
    config = model.config
    statistics = AttentionStatistics(config.num_hidden_layers, config.num_attention_heads, positions)
    with observing_attention(model, STATISTICS_ARGUMENT, statistics):
        yield statistics


@contextmanager
def observing_attention(model: nn.Module, argument: str, observer) -> Iterator[None]:
    """Hands `observer` to the attention layers of every forward pass of the model's decoder
    (model.base_model) while the block runs, as the forward argument `argument` (a forward
    pre-hook adds it). A transformers softmax model attends meanwhile through the statistics
    attention (SDPA, its outputs unchanged, plus the observers); afterwards it is back on the
    attention it had, and nothing is left on the model."""
    from sb_eval.model.modeling import StickBreakingForCausalLM

    softmax = not isinstance(model, StickBreakingForCausalLM)
    if softmax:
        softmax_attention_modules(model)  # raises for an architecture the statistics cannot observe
        previous = model.config._attn_implementation
        register_stats_attention()
        model.set_attn_implementation(STATS_ATTENTION)
    hook = model.base_model.register_forward_pre_hook(partial(_pass_observer, argument, observer), with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        if softmax:
            model.set_attn_implementation(previous)


def _pass_observer(argument: str, observer, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, {**kwargs, argument: observer}


def softmax_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a transformers decoder that attends through the attention
    interface (Llama-family: they carry layer_idx, scaling and num_key_value_groups)."""
    modules = [
        m for m in model.modules()
        if all(hasattr(m, name) for name in ("layer_idx", "scaling", "num_key_value_groups"))
    ]
    layers = model.config.num_hidden_layers
    if len(modules) != layers or sorted(m.layer_idx for m in modules) != list(range(layers)):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: found {len(modules)} attention modules with layer_idx, scaling "
            f"and num_key_value_groups for {layers} layers; attention statistics support "
            "stick-breaking checkpoints (sb_hf) and transformers decoders that attend through "
            "AttentionInterface (Llama-family models)"
        )
    return modules


# ---------------------------------------------------------------------------------------------
# Recording during an lm-eval run.


class StatisticsRecorder:
    """Collects the statistics of every forward pass of a model and keeps a JSON file of them.

    The file is rewritten (atomically) when ``write`` is called, after a forward pass once
    ``flush_seconds`` have passed since the last write, and a last time by ``close``, or, when
    the recorder is never closed, when it is garbage-collected or the interpreter exits. Writing
    after every pass would add a device-to-host copy and a file write to each decoded token; this
    way a crash loses at most the last ``flush_seconds`` of statistics.

    The last write is a ``weakref.finalize`` that holds the statistics, path and info but not
    the recorder or the model: an atexit callback bound to the recorder would keep the model's
    weights alive (on the GPU) until the interpreter exits.
    """

    def __init__(self, model: nn.Module, path: str | Path, info: dict, flush_seconds: float = 60.0) -> None:
        self.path = Path(path)
        self.info = dict(info)
        self.flush_seconds = flush_seconds
        self._collection = ExitStack()
        self.statistics = self._collection.enter_context(collecting_attention_statistics(model, positions="all"))
        self._hook = model.base_model.register_forward_hook(self._after_forward)
        self._written_at = time.monotonic()
        self.write()
        self._last_write = weakref.finalize(self, _write_last_time, self.path, self.info, self.statistics)

    def _after_forward(self, module, args, output) -> None:
        if time.monotonic() - self._written_at >= self.flush_seconds:
            self.write()

    def write(self) -> None:
        _write_statistics(self.path, self.info, self.statistics)
        self._written_at = time.monotonic()

    def close(self) -> None:
        """Writes the file a last time and stops collecting; the model is left as it was."""
        self.write()
        self._last_write.detach()
        self._hook.remove()
        self._collection.close()


def _write_statistics(path: Path, info: dict, statistics: AttentionStatistics) -> None:
    document = {**info, "statistics": statistics.to_dict()}
    # default=str: the model info holds a few non-JSON values (torch dtypes)
    write_atomically(path, (json.dumps(document, indent=1, default=str) + "\n").encode())


def _write_last_time(path: Path, info: dict, statistics: AttentionStatistics) -> None:
    """The write of a recorder that was never closed: at exit or when it is collected, where an
    error can only be reported."""
    try:
        _write_statistics(path, info, statistics)
    except OSError as error:
        logger.warning("could not write attention statistics to %s: %s", path, error)
