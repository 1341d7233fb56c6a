"""Span mass and attribution on a GPU: the compiled split-key kernels at the dtypes and lengths
answers are produced at, against the float64 definition; generation with attribution against the
explicit matrices; and its memory."""

import pytest
import torch
from test_attention_stats import left_padded_batch, record_stick_breaking_inputs, stick_breaking_matrix
from test_attribution import STEPS, check_against_matrices, generate_recorded, random_prompt_spans
from test_attention_stats_gpu import peak_extra_bytes
from test_kernels import long_range_inputs, random_inputs
from test_span_mass import explicit_span_mass, random_spans, visibility

from sb_eval.analysis.attribution import FIRST_NEEDLE, collecting_span_mass
from sb_eval.kernels.attention import stickbreaking_attention
from sb_eval.model.configuration import tiny_config
from sb_eval.model.modeling import StickBreakingForCausalLM

pytestmark = pytest.mark.gpu

# float32 as in the statistics tests: the stick is a sum of thousands of float32 log terms
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Hq, Hkv, Tq, Tk", [(16, 4, 1, 20011), (8, 8, 4, 4099), (16, 2, 2, 777)])
def test_split_key_span_mass_at_real_sizes(dtype, Hq, Hkv, Tq, Tk):
    q, k, v = random_inputs(2, Hq, Hkv, Tq, Tk, 128, dtype, "cuda", logit_std=3.0, seed=Tk)
    key_mask = torch.ones(2, Tk, dtype=torch.bool, device="cuda")
    key_mask[1, : Tk // 4] = False
    key_spans = random_spans(2, Tk, 9, seed=Tq).cuda()
    _, rem, span_mass = stickbreaking_attention(q, k, v, key_mask=key_mask, key_spans=key_spans, num_spans=9, backend="triton")
    expected = explicit_span_mass(q.cpu(), k.cpu(), 128**-0.5, visibility(Tq, Tk, False, key_mask.cpu()), key_spans.cpu(), 9)
    assert (span_mass.cpu().double() - expected).abs().max().item() <= TOLERANCE[dtype]
    assert (span_mass.sum(-1) + rem - 1).abs().max().item() <= TOLERANCE[dtype]


def test_span_mass_over_a_long_range_stick():
    """Every logit near -10: the stick lasts 30K keys and a needle 25K keys back takes its share."""
    q, k, v = long_range_inputs(1, 8, 8, 1, 30000, 64, torch.bfloat16, "cuda", logit=-10.0)
    key_spans = torch.zeros(1, 30000, dtype=torch.long, device="cuda")
    key_spans[0, 5000:5040] = 1
    _, rem, span_mass = stickbreaking_attention(q, k, v, key_spans=key_spans, num_spans=2, backend="triton")
    expected = explicit_span_mass(q.cpu(), k.cpu(), 64**-0.5, visibility(1, 30000, False, None), key_spans.cpu(), 2)
    assert expected[..., 1].min() > 1e-4
    assert torch.allclose(span_mass.cpu().double(), expected, rtol=2e-2, atol=1e-5)


def test_generation_with_attribution_on_the_kernels(monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(n_layer=2, n_embd=256, n_inner=512, n_head=4, num_key_value_heads=2, attention_head_type="gqa",
                         sb_attend_current=True)
    model = StickBreakingForCausalLM(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(4.0)
    model = model.cuda()
    ids, mask = left_padded_batch((1500, 900), config.vocab_size, seed=1)
    T = ids.shape[1]
    prompt_spans = random_prompt_spans(2, T, seed=2)
    generated, recorded = generate_recorded(model, ids.cuda(), mask.cuda(), prompt_spans.cuda())
    calls = record_stick_breaking_inputs(monkeypatch)
    full_mask = torch.cat([mask, torch.ones(2, STEPS, dtype=mask.dtype)], dim=1).cuda()
    with torch.no_grad():
        model(generated[:, : T + STEPS], attention_mask=full_mask)
    n = T + STEPS
    positions = torch.arange(n, device="cuda")
    visible = (positions[None, :] <= positions[:, None])[None, None] & full_mask.bool()[:, None, None, :]
    matrices = [stick_breaking_matrix(q, k, config.attention_scale, visible).cpu() for q, k in calls]
    check_against_matrices(recorded, matrices, prompt_spans, T, remainder=True, atol=1e-5)


@torch.no_grad()
def test_attribution_memory_is_linear_in_length():
    """At 16K tokens, attributing every answer token adds the span indices of the keys ([B, T]
    integers) and masses per query, head and span: megabytes, where one head's T x T weights in
    bf16 would take 512 MiB."""
    T = 16384
    model = StickBreakingForCausalLM(tiny_config(n_embd=512, n_head=8, n_layer=2, n_inner=1024)).to("cuda", torch.bfloat16).eval()
    model.set_attention_backend("triton")
    ids = torch.randint(0, 256, (1, T), device="cuda")
    spans = torch.zeros(1, T, dtype=torch.int32, device="cuda")
    spans[0, 4000:4030] = FIRST_NEEDLE

    def generation():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)

    plain = peak_extra_bytes(generation)
    with collecting_span_mass(model) as recorder:
        def attributed():
            recorder.start(spans, FIRST_NEEDLE + 1, 8)
            generation()
            recorder.finish()

        with_spans = peak_extra_bytes(attributed)
    one_matrix = T * T * 2
    assert with_spans - plain < one_matrix // 32
