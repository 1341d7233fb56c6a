"""Attention statistics against explicit float64 attention matrices, for stick-breaking and softmax
models; recording during lm-eval runs; and that collection changes nothing when off."""

import gc
import json
import weakref

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_module
from lm_eval.api.instance import Instance
from transformers import LlamaConfig, LlamaForCausalLM

import sb_eval.model.modeling
from sb_eval.analysis.attention_stats import (
    REMAINDER_CONVENTIONS,
    STATS_ATTENTION,
    AttentionStatistics,
    collecting_attention_statistics,
    query_distances,
    softmax_attention_distance,
)
from sb_eval.harness.stick_breaking_lm import StickBreakingLM
from sb_eval.model.configuration import tiny_config
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.model.saving import write_random_checkpoint

# ---------------------------------------------------------------------------------------------
# The definitions, written out over full matrices in float64.


def stick_breaking_matrix(q, k, scale, visible):
    """A [B, H, Tq, Tk]: A_ij = beta_ij * prod over visible keys k strictly between i and j of
    (1 - beta_kj), as a product (the kernels use softplus sums)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    beta = torch.sigmoid(scale * q.double() @ k.double().transpose(-1, -2))
    log_keep = torch.where(visible, torch.log1p(-beta), 0.0)
    nearer = log_keep.flip(-1).cumsum(-1).flip(-1) - log_keep  # sum over keys k > i
    return torch.where(visible, beta * torch.exp(nearer), 0.0)


def softmax_matrix(q, k, scale, visible):
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    logits = scale * q.double() @ k.double().transpose(-1, -2)
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)


def explicit_statistics(A, query_pos, visible, counted):
    """Per-head means over counted queries under each convention, and the mean mass, from the
    matrix A [B, H, Tq, Tk]; query_pos [Tq]; visible [B|1, 1, Tq, Tk]; counted [B, Tq]."""
    Tk = A.shape[-1]
    gap = (query_pos[:, None] - torch.arange(Tk)[None, :]).double()
    tokens_back = (A * gap).sum(-1)
    mass = A.sum(-1)
    first_visible = torch.where(visible, torch.arange(Tk), Tk).amin(-1)  # [B|1, 1, Tq]
    farthest = torch.where(first_visible < Tk, query_pos - first_visible, 0).double()
    per_query = {
        "ignore": tokens_back,
        "renormalize": tokens_back / mass,
        "farthest": tokens_back + (1 - mass) * farthest,
    }
    weight = counted[:, None, :].double().expand_as(mass)
    means = {c: (torch.where(weight > 0, v, 0.0).sum((0, 2)) / weight.sum((0, 2))) for c, v in per_query.items()}
    means["mass"] = (mass * weight).sum((0, 2)) / weight.sum((0, 2))
    return means


def assert_statistics_match(found: dict, expected_by_layer: list[dict]):
    for layer, expected in enumerate(expected_by_layer):
        got_mass = torch.tensor(found["mass"]["mean"][layer], dtype=torch.float64)
        assert torch.allclose(got_mass, expected["mass"], rtol=1e-5, atol=0), layer
        for convention in REMAINDER_CONVENTIONS:
            got = torch.tensor(found["tokens_back"][convention]["mean"][layer], dtype=torch.float64)
            assert torch.allclose(got, expected[convention], rtol=1e-5, atol=0), (layer, convention)


def left_padded_batch(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), vocab - 1)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(0, vocab - 1, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def record_stick_breaking_inputs(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (q, k) of every stick-breaking attention call from now on, one per layer and pass."""
    calls = []
    original = sb_eval.model.modeling.stickbreaking_attention

    def recording(q, k, v, **kwargs):
        calls.append((q, k))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(sb_eval.model.modeling, "stickbreaking_attention", recording)
    return calls


def record_sdpa_inputs(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (query, key) of every call of transformers' SDPA attention from now on."""
    calls = []
    original = sdpa_module.sdpa_attention_forward

    def recording(module, query, key, *args, **kwargs):
        calls.append((query, key))
        return original(module, query, key, *args, **kwargs)

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", recording)
    return calls


# ---------------------------------------------------------------------------------------------
# Stick-breaking models: the kernel's fused statistics through the model's attention.

SB_VARIANTS = {
    "mha": dict(),
    "gqa-attend-current-bias": dict(
        n_head=4, num_key_value_heads=2, attention_head_type="gqa", sb_attend_current=True, sb_remainder_bias=True
    ),
}


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("variant", SB_VARIANTS)
def test_stick_breaking_statistics_match_explicit_matrices(variant, positions, monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(n_layer=2, n_embd=64, n_inner=96, **SB_VARIANTS[variant])
    model = StickBreakingForCausalLM(config).eval()
    model.set_attention_backend("torch")
    # Larger q and k than the initialisation gives, so that the stick is not used up at once.
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(6.0)
    calls = record_stick_breaking_inputs(monkeypatch)
    # "all": a left-padded batch (padding queries are not counted); "last": whole windows.
    lengths = (37, 24, 31) if positions == "all" else (37, 37)
    ids, mask = left_padded_batch(lengths, config.vocab_size, seed=1)
    with collecting_attention_statistics(model, positions) as statistics, torch.no_grad():
        model(ids, attention_mask=mask)

    expected = []
    for q, k in calls:
        T = q.shape[2]
        j, i = torch.arange(T)[:, None], torch.arange(T)[None, :]
        causal = (i <= j) if config.sb_attend_current else (i < j)
        padding = mask.bool()
        visible = causal[None, None] & padding[:, None, None, :]
        counted = padding & visible.any(-1)[:, 0]
        if positions == "last":
            counted = counted & (torch.arange(T) == T - 1)
        A = stick_breaking_matrix(q, k, config.attention_scale, visible)
        expected.append(explicit_statistics(A, torch.arange(T), visible, counted))
    found = statistics.to_dict()
    assert found["forward_passes"] == 1
    assert_statistics_match(found, expected)
    # every head's remainder conventions differ: the stick is not used up
    mean = found["model_mean"]["tokens_back"]
    assert mean["ignore"] < mean["renormalize"] < mean["farthest"]


def test_stick_breaking_statistics_through_the_triton_kernels(monkeypatch):
    """The same numbers when the triton backend (CPU interpreter without a GPU) runs the layers."""
    torch.manual_seed(2)
    model = StickBreakingForCausalLM(tiny_config(n_layer=1, n_embd=64, n_inner=96)).eval()
    ids = torch.randint(0, 256, (1, 40))
    results = []
    for backend in ("torch", "triton"):
        model.set_attention_backend(backend)
        with collecting_attention_statistics(model, "all") as statistics, torch.no_grad():
            model(ids)
        results.append(statistics.to_dict())
    for convention in REMAINDER_CONVENTIONS:
        torch_means, triton_means = (torch.tensor(r["tokens_back"][convention]["mean"]) for r in results)
        assert torch.allclose(triton_means, torch_means, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Softmax models: blocked online softmax beside SDPA.


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("positions", ["all", "last"])
def test_softmax_statistics_match_explicit_matrices(llama, positions, monkeypatch):
    lengths = (29, 18, 25) if positions == "all" else (29, 29)
    ids, mask = left_padded_batch(lengths, 257, seed=6)
    with torch.no_grad():
        reference_logits = llama(ids, attention_mask=mask).logits

    calls = record_sdpa_inputs(monkeypatch)
    with collecting_attention_statistics(llama, positions) as statistics, torch.no_grad():
        logits = llama(ids, attention_mask=mask).logits
    assert torch.equal(logits, reference_logits)  # the model's outputs are SDPA's, unchanged

    T = ids.shape[1]
    padding = mask.bool()
    visible = (torch.arange(T)[None, :] <= torch.arange(T)[:, None])[None, None] & padding[:, None, None, :]
    counted = padding if positions == "all" else padding & (torch.arange(T) == T - 1)
    expected = [
        explicit_statistics(softmax_matrix(q, k, llama.config.head_dim ** -0.5, visible), torch.arange(T), visible, counted)
        for q, k in calls
    ]
    found = statistics.to_dict()
    assert found["queries"][0] == [int(counted.sum())] * 4
    assert_statistics_match(found, expected)


def test_softmax_statistics_without_padding_and_while_decoding(llama, monkeypatch):
    """No padding: transformers passes no mask and SDPA runs is_causal; decoding: one query
    against the cache. The last query of the prefill and of each step, against the explicit
    matrices of one forward pass over the same tokens."""
    prompt = torch.randint(0, 256, (1, 18), generator=torch.Generator().manual_seed(7))
    with collecting_attention_statistics(llama, "last") as statistics, torch.no_grad():
        generated = llama.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=256)
    found = statistics.to_dict()
    assert found["forward_passes"] == 3
    assert found["queries"][0] == [3] * 4  # positions 17 (prefill), 18 and 19 (steps)

    calls = record_sdpa_inputs(monkeypatch)
    with torch.no_grad():
        llama(generated[:, :20])
    T = 20
    visible = (torch.arange(T)[None, :] <= torch.arange(T)[:, None])[None, None]
    counted = (torch.arange(T) >= 17)[None]
    expected = [
        explicit_statistics(softmax_matrix(q, k, llama.config.head_dim ** -0.5, visible), torch.arange(T), visible, counted)
        for q, k in calls
    ]
    assert_statistics_match(found, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_softmax_distance_matches_the_matrix(dtype):
    g = torch.Generator().manual_seed(8)
    B, Hq, Hkv, Tq, Tk, D = 2, 6, 2, 45, 70, 16
    q = (torch.randn(B, Hq, Tq, D, generator=g) * 2).to(dtype)
    k = (torch.randn(B, Hkv, Tk, D, generator=g) * 2).to(dtype)
    positions = torch.arange(Tk - Tq, Tk)
    padding = torch.ones(B, Tk, dtype=torch.bool)
    padding[1, :33] = False  # row 1: left padding; its first queries see nothing
    visible = (torch.arange(Tk)[None, :] <= positions[:, None])[None, None] & padding[:, None, None, :]
    A = softmax_matrix(q, k, 0.3, visible)
    expected = (A * (positions[:, None] - torch.arange(Tk)[None, :]).double()).sum(-1)
    found = softmax_attention_distance(q, k, scale=0.3, query_positions=positions, mask=visible, key_block=16, query_block=7)
    assert torch.allclose(found.double(), expected, rtol=1e-5, atol=1e-12)
    assert (found[1, :, : 33 - (Tk - Tq)] == 0).all()  # padding queries that see no key
    # mask None: causal, key i visible to query j when i <= j
    causal = softmax_attention_distance(q[:1], k[:1], scale=0.3, query_positions=positions, key_block=9, query_block=11)
    assert torch.allclose(causal.double(), expected[:1], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Conventions, collection on and off, lm-eval recording.


def test_remainder_conventions_by_hand():
    # query 0 at j = 10 sees keys 4..9 (F = 6): weights 0.5 at distance 1 and 0.25 at distance 4;
    # query 1 has an empty stick; query 2 a nearly empty one.
    tokens_back = torch.tensor([0.5 * 1 + 0.25 * 4, 0.0, 0.0], dtype=torch.float64)
    mass = torch.tensor([0.75, 0.0, 0.5**40], dtype=torch.float64)
    farthest_gap = torch.tensor([6.0, 3.0, 2.0], dtype=torch.float64)
    distances, has_mass = query_distances(tokens_back, mass, farthest_gap)
    assert distances["ignore"].tolist() == [1.5, 0.0, 0.0]
    assert distances["renormalize"][0].item() == 2.0
    assert distances["farthest"].tolist() == [1.5 + 0.25 * 6, 3.0, 2.0 * (1 - 0.5**40)]
    assert has_mass.tolist() == [True, False, True]  # an empty stick has no renormalized distance
    # a float32 remainder's rounding cannot push the renormalized distance beyond F
    rounded, _ = query_distances(torch.tensor([1e-7]), torch.tensor([1e-8]), torch.tensor([5.0]))
    assert rounded["renormalize"].item() == 5.0
    # softmax: no remainder, one distance
    softmax, _ = query_distances(torch.tensor([3.0]), torch.tensor([1.0]), None)
    assert [softmax[c].item() for c in REMAINDER_CONVENTIONS] == [3.0, 3.0, 3.0]


def test_queries_with_no_mass_are_left_out_of_renormalize_only():
    statistics = AttentionStatistics(num_layers=1, num_heads=1)
    statistics.record(
        0, torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[0.5, 0.0]]]),
        torch.tensor([[[4.0, 4.0]]]), torch.tensor([[True, True]]),
    )
    found = statistics.to_dict()
    assert found["queries"] == [[2]]
    assert found["tokens_back"]["renormalize"]["queries"] == [[1]]
    assert found["tokens_back"]["renormalize"]["mean"] == [[4.0]]
    assert found["tokens_back"]["ignore"]["mean"] == [[1.0]]
    assert found["tokens_back"]["farthest"]["mean"] == [[(2.0 + 0.5 * 4 + 4.0) / 2]]
    assert found["mass"]["mean"] == [[0.25]]


def test_collection_is_off_unless_requested(llama, monkeypatch):
    torch.manual_seed(9)
    model = StickBreakingForCausalLM(tiny_config(n_layer=1, n_embd=64, n_inner=96)).eval()
    asked = []
    original = sb_eval.model.modeling.stickbreaking_attention

    def recording(q, k, v, **kwargs):
        asked.append(kwargs["return_stats"])
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(sb_eval.model.modeling, "stickbreaking_attention", recording)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        model(ids)
        with collecting_attention_statistics(model):
            model(ids)
        model(ids)
    assert asked == [False, True, False]
    with collecting_attention_statistics(llama):
        assert llama.config._attn_implementation == STATS_ATTENTION
    assert llama.config._attn_implementation == "sdpa"
    # nothing is left on the models: no hook, no attribute on a layer
    for collected in (model, llama):
        assert not collected.base_model._forward_pre_hooks
        assert all(not hasattr(m, "attention_statistics") for m in collected.modules())


def instances(kind, arguments):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_sb_hf_records_statistics_of_every_forward_pass(tmp_path):
    folder = write_random_checkpoint(tmp_path / "ckpt", tiny_config(n_layer=2, n_embd=64, n_inner=96), seed=10)
    path = tmp_path / "stats" / "attention.json"
    plain = StickBreakingLM(pretrained=str(folder), device="cpu", batch_size=2)
    recording = StickBreakingLM(pretrained=str(folder), device="cpu", batch_size=2, attention_stats=str(path))
    assert recording.get_model_info()["sb_attention_stats"] == str(path)
    assert plain.get_model_info()["sb_attention_stats"] is None
    assert path.is_file()  # written at once, with zero counts

    pairs = [("The quick brown fox", " jumps over"), ("x", "yz"), ("Stick-breaking " * 3, "attention.")]
    ours = recording.loglikelihood(instances("loglikelihood", pairs))
    assert ours == plain.loglikelihood(instances("loglikelihood", pairs))  # outputs unchanged
    written = json.loads(path.read_text())  # rewritten when the requests are done
    # right-padded batches: every real position but the first (which sees no key) counts
    tokens = sum(len(recording.tok_encode(c + x)) - 1 for c, x in pairs)
    assert written["statistics"]["queries"] == [[tokens - len(pairs)] * 4] * 2
    assert written["statistics"]["forward_passes"] == 2  # batches of 2 and 1
    assert written["pretrained"] == str(folder)

    requests = [("Once upon a time", {"until": ["\n"], "max_gen_toks": 5})]
    assert recording.generate_until(instances("generate_until", requests)) == plain.generate_until(
        instances("generate_until", requests)
    )
    after = json.loads(path.read_text())["statistics"]
    assert after["forward_passes"] > 2
    assert after["queries"][0][0] > tokens - len(pairs)
    recording.attention_recorder.close()


def test_sb_hf_with_attention_stats_frees_its_model(tmp_path):
    # The last write must not keep the recorder, and so the model's weights, alive until exit.
    folder = write_random_checkpoint(tmp_path / "ckpt", tiny_config(n_layer=1, n_embd=32, n_inner=64), seed=11)
    path = tmp_path / "attention.json"
    lm = StickBreakingLM(pretrained=str(folder), device="cpu", batch_size=1, attention_stats=str(path))
    lm.loglikelihood(instances("loglikelihood", [("Once upon", " a time")]))
    model = weakref.ref(lm.model)
    path.unlink()
    del lm
    gc.collect()
    assert model() is None
    assert json.loads(path.read_text())["statistics"]["forward_passes"] == 1  # written when collected

    closed = StickBreakingLM(pretrained=str(folder), device="cpu", batch_size=1, attention_stats=str(path))
    closed.close()
    assert not closed.model.base_model._forward_pre_hooks and not closed.model.base_model._forward_hooks
    path.unlink()
    model = weakref.ref(closed.model)
    del closed
    gc.collect()
    assert model() is None and not path.exists()  # closed: not written again
