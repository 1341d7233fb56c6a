"""The transformers model against an independent reading of the released architecture."""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import sb_eval.model.modeling
from sb_eval.model.configuration import tiny_config
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.model.saving import write_random_checkpoint

VARIANTS = {
    "released": dict(),
    "gqa": dict(n_head=4, num_key_value_heads=2, attention_head_type="gqa"),
    "mqa": dict(n_head=4, num_key_value_heads=1, attention_head_type="mqa"),
    "value-remainder": dict(sb_remainder=True),
    "bias-remainder-groupnorm": dict(sb_remainder_bias=True, sb_group_norm=True, sb_attend_current=True),
    "layernorm-gelu-untied-biases": dict(
        normalization_function="layernorm", activation_function="gelu_pytorch_tanh",
        tie_word_embeddings=False, add_bias=True, m_emb=None, m_residual=None, m_width=None,
        attention_multiplier=None,
    ),
}


def reference_logits(weights: dict, config, ids: torch.Tensor) -> torch.Tensor:
    """The released architecture written out in float64 from the raw tensors, one query at a time."""
    w = {name: t.double() for name, t in weights.items()}
    H, Hkv, D = config.n_head, config.num_key_value_heads, config.n_embd // config.n_head
    scale = config.attention_scale

    def norm(x, prefix):
        if config.normalization_function == "rmsnorm":
            return w[f"{prefix}.weight"] * x / torch.sqrt((x * x).mean(-1, keepdim=True) + config.layer_norm_epsilon)
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return w[f"{prefix}.weight"] * (x - mean) / torch.sqrt(var + config.layer_norm_epsilon) + w[f"{prefix}.bias"]

    def linear(x, prefix):
        y = x @ w[f"{prefix}.weight"].T
        return y + w[f"{prefix}.bias"] if f"{prefix}.bias" in w else y

    T = ids.shape[0]
    x = w["transformer.wte.weight"][ids] * (config.m_emb or 1.0)
    for layer in range(config.n_layer):
        p = f"transformer.h.{layer}"
        qkv = linear(norm(x, f"{p}.ln_1"), f"{p}.attn.c_attn")  # [T, (H + 2 Hkv) D]
        if config.attention_head_type == "mqa":
            q = qkv[:, : H * D].reshape(T, H, D)
            k = qkv[:, H * D : H * D + D].reshape(T, 1, D)
            v = qkv[:, H * D + D :].reshape(T, 1, D)
        else:
            g = H // Hkv
            per = qkv.reshape(T, Hkv, (g + 2) * D)
            q = per[..., : g * D].reshape(T, H, D)
            k, v = per[..., g * D : (g + 1) * D], per[..., (g + 1) * D :]
        out = torch.zeros(T, H, D, dtype=torch.float64)
        for h in range(H):
            kv = h // (H // k.shape[1])
            for j in range(T):
                stick, o = 1.0, torch.zeros(D, dtype=torch.float64)
                last = j if config.sb_attend_current else j - 1
                for i in range(last, -1, -1):  # the nearest key breaks the stick first
                    beta = torch.sigmoid(scale * q[j, h] @ k[i, kv])
                    o = o + stick * beta * v[i, kv]
                    stick = stick * (1 - beta)
                if config.sb_remainder:
                    o = o + stick * v[j, kv]
                if config.sb_remainder_bias:
                    o = o + stick * w[f"{p}.attn.remainder_bias"][h]
                out[j, h] = o
        attn = out.reshape(T, H * D)
        if config.sb_group_norm:
            groups = attn.reshape(T, H, D)
            mean = groups.mean(-1, keepdim=True)
            var = ((groups - mean) ** 2).mean(-1, keepdim=True)
            attn = ((groups - mean) / torch.sqrt(var + 1e-5)).reshape(T, H * D)
            attn = attn * w[f"{p}.attn.group_norm.weight"] + w[f"{p}.attn.group_norm.bias"]
        x = x + (config.m_residual or 1.0) * linear(attn, f"{p}.attn.c_proj")
        h_mlp = linear(norm(x, f"{p}.ln_2"), f"{p}.mlp.c_fc")
        if config.activation_function == "swiglu":
            up, gate = h_mlp.chunk(2, dim=-1)
            h_mlp = up * gate * torch.sigmoid(gate)
        else:
            h_mlp = 0.5 * h_mlp * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h_mlp + 0.044715 * h_mlp**3)))
        x = x + (config.m_residual or 1.0) * linear(h_mlp, f"{p}.mlp.c_proj")
    x = norm(x, "transformer.ln_f")
    head = w["transformer.wte.weight"] if config.tie_word_embeddings else w["lm_head.weight"]
    return (x @ head.T) / (config.m_width or 1.0)


def randomize_zero_parameters(folder):
    """Biases, remainder bias and norm parameters start at 0 or 1; give them random values so
    that the comparison sees them."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "ln_" in name or "group_norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    model.save_pretrained(folder)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_independent_implementation(variant, tmp_path):
    config = tiny_config(n_layer=2, n_embd=64, n_inner=96, **VARIANTS[variant])
    write_random_checkpoint(tmp_path / "ckpt", config, seed=1)
    randomize_zero_parameters(tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(model, StickBreakingForCausalLM)
    ids = torch.randint(0, config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits[0]
    expected = reference_logits(load_file(tmp_path / "ckpt" / "model.safetensors"), model.config, ids[0])
    scale = expected.abs().max()
    assert (logits.double() - expected).abs().max() / scale < 1e-5


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = write_random_checkpoint(tmp_path_factory.mktemp("sb") / "ckpt", seed=3)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def greedy_by_recompute(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generation_with_cache_equals_recompute(tiny_model):
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        generated = tiny_model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=256)
    assert torch.equal(generated, greedy_by_recompute(tiny_model, ids, 12))


def test_decode_attends_once_per_new_token(tiny_model, monkeypatch):
    """Prefill once, then each new token is one single-query call against the grown cache."""
    calls = []
    original = sb_eval.model.modeling.stickbreaking_attention

    def recording(q, k, v, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(sb_eval.model.modeling, "stickbreaking_attention", recording)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tiny_model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=256)
    layers = tiny_model.config.n_layer
    assert calls[:layers] == [(30, 30)] * layers
    assert calls[layers:] == [(1, 31 + step) for step in range(4) for _ in range(layers)]


def test_left_padded_batch_equals_single_runs(tiny_model):
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (17, 33, 25)]
    width = max(len(p) for p in prompts)
    batch = torch.full((3, width), 256)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    with torch.no_grad():
        together = tiny_model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=256)
        for row, p in enumerate(prompts):
            alone = tiny_model.generate(p[None], max_new_tokens=8, do_sample=False, pad_token_id=256)
            assert torch.equal(together[row, width:], alone[0, len(p):])


def test_labels_give_the_next_token_loss(tiny_model):
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    out = tiny_model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 257), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected)
