"""Needle attention attribution: the answering query's span mass during generation against explicit
float64 matrices (stick-breaking and softmax), needles located in prompts, the summaries, the
`sb-eval attribution` command and sb_hf's attribution model argument, on tiny models."""

import json

import pytest
import torch
from lm_eval.api.instance import Instance
from test_attention_stats import left_padded_batch, record_sdpa_inputs, record_stick_breaking_inputs, softmax_matrix, stick_breaking_matrix
from tiny_models import write_tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from sb_eval.analysis.attribution import (
    CONTEXT,
    DISTRACTORS,
    FIRST_NEEDLE,
    GENERATED,
    PARTS,
    QUESTION,
    collecting_span_mass,
    prompt_span_indices,
    summarize,
    token_ranges,
)
from sb_eval.commands.attribution import main
from sb_eval.harness.attributed_answers import AttributionError, prompt_layout
from sb_eval.harness.stick_breaking_lm import StickBreakingLM
from sb_eval.model.configuration import tiny_config
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.model.saving import write_random_checkpoint
from sb_eval.ruler import needles
from sb_eval.ruler.generate import generate
from sb_eval.ruler.mqrar import instances
from sb_eval.ruler.registry import TASKS
from sb_eval.tokenization import byte_level_tokenizer

STEPS = 3
NUM_SPANS = 6

# ---------------------------------------------------------------------------------------------
# Span mass while generating, against explicit matrices.


def random_prompt_spans(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    spans = torch.randint(0, NUM_SPANS, (B, T // 3 + 1), generator=g).repeat_interleave(3, dim=1)[:, :T]
    return torch.where(spans == GENERATED, CONTEXT, spans)  # GENERATED marks the answer's keys only


def generate_recorded(model, ids, mask, prompt_spans):
    with collecting_span_mass(model) as recorder, torch.no_grad():
        recorder.start(prompt_spans, NUM_SPANS, STEPS)
        generated = model.generate(
            ids, attention_mask=mask, max_new_tokens=STEPS + 1, min_new_tokens=STEPS + 1, do_sample=False, pad_token_id=0,
        )
        recorded = recorder.finish()
    return generated, recorded


def check_against_matrices(recorded, matrices, prompt_spans, T, remainder: bool, atol: float = 2e-6):
    """matrices: per layer A [B, H, T', T'] over the prompt and the answer; step s is row
    T - 1 + s. Every key after the prompt is GENERATED."""
    B = prompt_spans.shape[0]
    assert recorded.mass.shape == (STEPS, B, len(matrices), matrices[0].shape[1], NUM_SPANS)
    key_spans = torch.cat([prompt_spans, torch.full((B, STEPS), GENERATED)], dim=1)
    for layer, A in enumerate(matrices):
        for step in range(STEPS):
            row = A[:, :, T - 1 + step, :]  # [B, H, keys]
            keys = key_spans[:, : row.shape[-1]]
            expected = torch.stack([(row * (keys == s)[:, None]).sum(-1) for s in range(NUM_SPANS)], dim=-1)
            assert torch.allclose(recorded.mass[step, :, layer].double(), expected, atol=atol), (layer, step)
            expected_remainder = (1 - row.sum(-1)) if remainder else torch.zeros_like(row[..., 0])
            assert torch.allclose(recorded.remainder[step, :, layer].double(), expected_remainder, atol=atol)
    # no key comes after the query: nothing generated is seen at step 0
    assert (recorded.mass[0, ..., GENERATED] == 0).all()
    assert (recorded.mass[1:, ..., GENERATED] > 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stick_breaking_span_mass_while_generating_matches_the_matrices(backend, monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(n_layer=2, n_embd=64, n_inner=96, n_head=4, num_key_value_heads=2, attention_head_type="gqa",
                         sb_attend_current=True)
    model = StickBreakingForCausalLM(config).eval()
    model.set_attention_backend(backend)
    with torch.no_grad():  # longer sticks than the initialisation gives
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(6.0)
    ids, mask = left_padded_batch((29, 20), config.vocab_size, seed=1)
    T = ids.shape[1]
    prompt_spans = random_prompt_spans(2, T, seed=2)
    generated, recorded = generate_recorded(model, ids, mask, prompt_spans)
    # the parts and the remainder share the whole stick
    assert torch.allclose(recorded.mass.sum(-1) + recorded.remainder, torch.ones(()), atol=1e-6)

    calls = record_stick_breaking_inputs(monkeypatch)
    full_mask = torch.cat([mask, torch.ones(2, STEPS, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        model(generated[:, : T + STEPS], attention_mask=full_mask)
    n = T + STEPS
    visible = (torch.arange(n)[None, :] <= torch.arange(n)[:, None])[None, None] & full_mask.bool()[:, None, None, :]
    matrices = [stick_breaking_matrix(q, k, config.attention_scale, visible) for q, k in calls]
    check_against_matrices(recorded, matrices, prompt_spans, T, remainder=True)


def test_softmax_span_mass_while_generating_matches_the_matrices(monkeypatch):
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    ids, mask = left_padded_batch((26, 19), 257, seed=4)
    T = ids.shape[1]
    prompt_spans = random_prompt_spans(2, T, seed=5)
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS + 1, min_new_tokens=STEPS + 1, do_sample=False, pad_token_id=0)
    generated, recorded = generate_recorded(model, ids, mask, prompt_spans)
    assert torch.equal(generated, plain)  # the answers are SDPA's, unchanged
    assert model.config._attn_implementation == "sdpa"
    assert (recorded.remainder == 0).all()
    assert torch.allclose(recorded.mass.sum(-1), torch.ones(()), atol=1e-6)

    calls = record_sdpa_inputs(monkeypatch)
    full_mask = torch.cat([mask, torch.ones(2, STEPS, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)  # as generate gives left-padded rows
    # through the statistics attention (nothing started: it only calls SDPA), which looks SDPA up
    # at each call and so meets the recording stand-in
    with collecting_span_mass(model), torch.no_grad():
        model(generated[:, : T + STEPS], attention_mask=full_mask, position_ids=positions)
    n = T + STEPS
    visible = (torch.arange(n)[None, :] <= torch.arange(n)[:, None])[None, None] & full_mask.bool()[:, None, None, :]
    matrices = [softmax_matrix(q, k, config.head_dim**-0.5, visible) for q, k in calls]
    check_against_matrices(recorded, matrices, prompt_spans, T, remainder=False)


def test_span_mass_is_measured_only_when_asked(monkeypatch):
    """Outside a started batch, or past its steps, the layers get no key spans and make no extra
    call; after collecting nothing is left on the model."""
    import sb_eval.model.modeling

    torch.manual_seed(6)
    model = StickBreakingForCausalLM(tiny_config(n_layer=1, n_embd=64, n_inner=96)).eval()
    asked = []
    original = sb_eval.model.modeling.stickbreaking_attention

    def counting(q, k, v, **kwargs):
        asked.append((q.shape[2], "key_spans" in kwargs))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(sb_eval.model.modeling, "stickbreaking_attention", counting)
    ids = torch.randint(0, 256, (1, 12))
    with collecting_span_mass(model) as recorder, torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # not started: nothing
        assert asked == [(12, False), (1, False)]
        asked.clear()
        recorder.start(torch.zeros(1, 12, dtype=torch.long), FIRST_NEEDLE, steps=1)
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        recorded = recorder.finish()
    # the prefill, then its last row alone; the decode steps past step 0 are plain
    assert asked == [(12, False), (1, True), (1, False), (1, False)]
    assert recorded.mass.shape[0] == 1
    assert not model.base_model._forward_pre_hooks
    # a batch whose passes never reach the prompt's end records no step
    with collecting_span_mass(model) as recorder, torch.no_grad():
        recorder.start(torch.zeros(1, 30, dtype=torch.long), FIRST_NEEDLE, 1)
        model(ids)
        nothing = recorder.finish()
    assert nothing.mass.shape == (0, 1, 1, 4, FIRST_NEEDLE) and nothing.remainder.shape == (0, 1, 1, 4)
    with pytest.raises(RuntimeError, match="previous batch was not finished"):
        recorder.start(torch.zeros(1, 3, dtype=torch.long), FIRST_NEEDLE, 1)
        recorder.start(torch.zeros(1, 3, dtype=torch.long), FIRST_NEEDLE, 1)


# ---------------------------------------------------------------------------------------------
# Spans in prompts.


def test_token_ranges_and_span_indices_by_hand():
    # "ab cd ef": tokens "ab", " cd", " ef" and a special token first
    offsets = [(0, 0), (0, 2), (2, 5), (5, 8)]
    assert token_ranges(offsets, [(3, 5), (0, 1), (2, 8)]) == [(2, 3), (1, 2), (2, 4)]
    with pytest.raises(ValueError, match="no token overlaps characters 8..8"):
        token_ranges(offsets, [(8, 8)])
    indices = prompt_span_indices(6, question=(4, 6), distractors=[(0, 2)], needles=[(2, 3), (1, 2)])
    assert indices == [DISTRACTORS, FIRST_NEEDLE + 1, FIRST_NEEDLE, CONTEXT, QUESTION, QUESTION]


@pytest.mark.parametrize("task", sorted(name for name in TASKS if TASKS[name].generator == "niah"))
def test_niah_needles_are_found_in_every_task(task, tmp_path, monkeypatch):
    from test_ruler_helpers import merging_bpe_tokenizer, write_standin_essays

    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(tmp_path))
    write_standin_essays(tmp_path)
    tokenizer = merging_bpe_tokenizer()
    spec = TASKS[task]
    for sample in generate(spec, 1500, tokenizer, 2, sizing="fill", use_cache=False):
        spans = needles.locate(spec.generator, sample["input"], sample["outputs"])
        assert [n.answer for n in spans.needles] == sample["outputs"]
        for needle in spans.needles:
            text = sample["input"][needle.start : needle.end]
            assert text.startswith("One of the special magic") and text.endswith(f"{needle.answer}.")
        expected_distractors = {"niah_multikey_1": 3}.get(task, 0)
        if task in ("niah_multikey_2", "niah_multikey_3"):  # a haystack of needles
            assert len(spans.distractors) > 3
        else:
            assert len(spans.distractors) == expected_distractors
        question = sample["input"][spans.question[0] :]
        assert question.startswith("What") and question.endswith(sample["answer_prefix"])
        # the layout in tokens: each needle's tokens spell it
        row_ids = tokenizer(sample["input"])["input_ids"]
        layout = prompt_layout(tokenizer, spec.generator, sample["input"], sample["outputs"], row_ids)
        for (first, end, answer), needle in zip(layout.needles, spans.needles):
            assert answer in tokenizer.decode(row_ids[first:end])
            assert layout.span_indices[first:end] == [FIRST_NEEDLE + layout.needles.index((first, end, answer))] * (end - first)


def test_variable_tracking_needles_are_the_chain_after_the_example():
    sample = generate(TASKS["vt"], 2500, byte_level_tokenizer(), 1, sizing="fill", use_cache=False)[0]
    spans = needles.locate("variable_tracking", sample["input"], sample["outputs"])
    texts = [sample["input"][n.start : n.end] for n in spans.needles]
    names = sample["outputs"]
    assert texts[0].startswith(f"VAR {names[0]} = ") and texts[0].split(" = ")[1].isdigit()
    assert texts[1:] == [f"VAR {later} = VAR {earlier} " for earlier, later in zip(names, names[1:])]
    example_end = sample["input"].rfind("Memorize and track")
    assert min(n.start for n in spans.needles) > example_end  # not the solved example's statements
    assert spans.distractors == []


def test_mqrar_needle_is_the_last_assignment_of_the_query_key():
    prompt = "k1 v5 k2 v7 k1 v9 k3 v1 k1"
    spans = needles.locate("mqrar", prompt, ["v9"])
    assert prompt[spans.needles[0].start : spans.needles[0].end] == "k1 v9"
    assert [prompt[a:b] for a, b in spans.distractors] == ["k1 v5"]
    assert prompt[spans.question[0] : spans.question[1]] == "k1"
    for instance in instances(3, 120, 16, seed=2, queries_per_sequence=2):
        found = needles.locate("mqrar", instance["context"], [instance["answer"]])
        assert instance["context"][found.needles[0].start : found.needles[0].end].endswith(instance["answer"])


@pytest.mark.parametrize(
    "generator, prompt, answers, message",
    [
        ("niah", "text\nOne of the special magic numbers for a-b is: 12.\nWhat is it?", ["99"], r"answer\(s\) \['99'\]"),
        ("niah", "no newline at all", ["1"], "no newline"),
        ("variable_tracking", "VAR ABCDE = 1\nQuestion?", ["ABCDE"], "task text"),
        ("mqrar", "k1 v2 k3 v4 k1", ["v7"], "last holds v2, not the answer v7"),
        ("mqrar", "k1 v2 k3 v4 k5", ["v2"], "never assigned"),
        ("mqrar", "k1 v2 k1 v3", ["v2"], "ends with a query key"),
        ("passkey", "x\ny", ["1"], "no needle locator for generator 'passkey'"),
    ],
)
def test_needles_that_are_not_there_are_named(generator, prompt, answers, message):
    with pytest.raises(ValueError, match=message):
        needles.locate(generator, prompt, answers)


def test_prompt_layout_with_a_start_token_and_a_cut_prompt():
    tokenizer = byte_level_tokenizer()
    prompt = "k1 v5 k2 v7 k1"
    ids = tokenizer(prompt)["input_ids"]
    with_start = prompt_layout(tokenizer, "mqrar", prompt, ["v5"], [tokenizer.eos_token_id] + ids)
    assert with_start.needles == [(1, 6, "v5")] and with_start.span_indices[0] == CONTEXT
    cut = prompt_layout(tokenizer, "mqrar", prompt, ["v5"], ids[2:])  # the first two tokens cut away
    assert cut.needles == [(0, 3, "v5")] and cut.question == (10, 12)
    with pytest.raises(AttributionError, match="a needle was cut away"):
        prompt_layout(tokenizer, "mqrar", prompt, ["v5"], ids[6:])
    with pytest.raises(AttributionError, match="do not match"):
        prompt_layout(tokenizer, "mqrar", prompt, ["v5"], ids[:-1])


# ---------------------------------------------------------------------------------------------
# Summaries.


def sample_with(task, length, found, needle_mass, score):
    """A sample with one needle; needle_mass [layer][head] at its only step."""
    zeros = [[0.0] * len(needle_mass[0]) for _ in needle_mass]
    step = {"token": "x", "needle_mass": needle_mass, "needle_masses": [[[v] for v in row] for row in needle_mass],
            **{f"{part}_mass": zeros for part in PARTS}, "remainder": zeros}
    return {"task": task, "length": length, "index": 0, "correct": found, "score": score, "prompt_tokens": 100,
            "needles": [{"answer": "1", "found": found, "tokens": [3, 5], "depth": 0.5}], "steps": [step]}


def test_summary_counts_attended_and_unattended_misses():
    samples = [
        sample_with("a", 1024, True, [[0.9, 0.1], [0.0, 0.2]], 100.0),
        sample_with("a", 1024, False, [[0.05, 0.0], [0.3, 0.0]], 0.0),  # missed, attended by layer 1 head 0
        sample_with("b", 1024, False, [[0.05, 0.0], [0.01, 0.0]], 0.0),  # missed, not attended
        sample_with("a", 2048, True, [[0.4, 0.0], [0.0, 0.0]], 100.0),
    ]
    summary = summarize(samples, threshold=0.1)
    first = summary["by_length"][0]
    assert (first["length"], first["samples"], first["correct"], first["needles"], first["missed"]) == (1024, 3, 1, 3, 2)
    assert (first["missed_attended"], first["missed_unattended"], first["found_attended"]) == (1, 1, 1)
    assert first["mean_top_needle_mass"] == pytest.approx((0.9 + 0.3 + 0.05) / 3, abs=1e-4)
    assert first["mean_needle_share"] == pytest.approx(0.02)
    assert first["missed_attended_at"] == {"0.01": 2, "0.03": 2, "0.1": 1, "0.3": 1}
    assert [(p["task"], p["length"]) for p in summary["by_point"]] == [("a", 1024), ("b", 1024), ("a", 2048)]
    assert summary["heads"][0][0] == pytest.approx((0.9 + 0.05 + 0.05 + 0.4) / 4)
    assert summary["top_heads"][0] == {"layer": 0, "head": 0, "mean_needle_mass": pytest.approx(0.35)}
    layer1 = summary["layers"][1]
    assert (layer1["found_mean"], layer1["missed_mean"]) == (pytest.approx(0.1), pytest.approx(0.155))
    assert (summary["layers"][0]["missed_attended"], layer1["missed_attended"]) == (0, 1)


# ---------------------------------------------------------------------------------------------
# The command and the model argument.


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("attribution")
    sb = write_random_checkpoint(root / "sb", tiny_config(n_layer=2, n_embd=64, n_inner=96), seed=21)
    write_tiny_llama(root / "llama", seed=22, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return {"sb": sb, "llama": root / "llama"}


def command(folders, out, *extra, tasks="sb_niah_single_1,sb_ruler_vt", lengths="2500"):
    return main([
        "--model_args", f"pretrained={folders['sb']}", "--tasks", tasks, "--lengths", lengths, "--num_samples", "1",
        "--answer_tokens", "all", "--max_new_tokens", "3", "--mqrar_pairs", "8,16", "--device", "cpu",
        "--output", str(out), *extra,
    ])


def check_sample(sample: dict, num_needles: int, heads: int, softmax: bool, max_steps: int = 3) -> None:
    assert len(sample["needles"]) == num_needles
    assert 0 < sample["depth"] < 1 and sample["prompt_tokens"] > sample["needles"][-1]["tokens"][1]
    assert 1 <= len(sample["steps"]) <= max_steps
    for step in sample["steps"]:
        masses = torch.tensor(step["needle_masses"])
        assert masses.shape == (2, heads, num_needles)
        assert torch.allclose(torch.tensor(step["needle_mass"]), masses.sum(-1), atol=1e-3)
        parts = sum(torch.tensor(step[f"{part}_mass"]) for part in PARTS) + torch.tensor(step["needle_mass"])
        assert torch.allclose(parts + torch.tensor(step["remainder"]), torch.ones(()), atol=1e-3)  # 4 decimals a part
        if softmax:
            assert not torch.tensor(step["remainder"]).any()


def test_attribution_command_writes_every_sample_and_resumes(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "out"
    assert command(folders, out, "--compare", f"hf:pretrained={folders['llama']}") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "found_vs_missed.png", "hf-llama.json", "needle_mass_by_depth.png", "retrieving_heads.png", "sb_hf-sb.json", "summary.md",
    ]
    for label, attention in (("sb_hf-sb", "stick-breaking"), ("hf-llama", "softmax")):
        document = json.loads((out / f"{label}.json").read_text())
        assert (document["attention"], document["layers"], document["heads"]) == (attention, 2, 4)
        assert sorted(s["task"] for s in document["samples"]) == ["sb_niah_single_1", "sb_ruler_vt"]
        for sample in document["samples"]:
            check_sample(sample, 5 if sample["task"] == "sb_ruler_vt" else 1, 4, attention == "softmax")
        assert document["summary"]["by_length"][0]["samples"] == 2
    summary = (out / "summary.md").read_text()
    assert "| sb_hf-sb | 2500 | 2 |" in summary and "| hf-llama | 2500 | 2 |" in summary

    # a rerun keeps what is there; more samples add only the new ones
    before = json.loads((out / "sb_hf-sb.json").read_text())["samples"]
    assert command(folders, out, "--num_samples", "2") == 0
    after = json.loads((out / "sb_hf-sb.json").read_text())["samples"]
    assert after[: len(before)] == before and len(after) == 4
    assert command(folders, out, "--seed", "7") == 2  # another seed would mix sets in one file


def test_mqrar_answers_are_greedy_continuations(folders, tmp_path):
    out = tmp_path / "out"
    assert command(folders, out, "--num_samples", "2", tasks="mqrar", lengths="150") == 0
    samples = json.loads((out / "sb_hf-sb.json").read_text())["samples"]
    assert [(s["num_pairs"], s["index"]) for s in samples] == [(8, 0), (16, 1)]
    tokenizer = byte_level_tokenizer()
    for sample in samples:
        # MQRAR generates its answer's tokens, whatever --max_new_tokens says
        answer_tokens = tokenizer(" " + sample["answers"][0])["input_ids"]
        check_sample(sample, 1, 4, softmax=False, max_steps=len(answer_tokens))
        assert sample["correct"] == (sample["prediction"] == " " + sample["answers"][0])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--tasks", "sb_ppl"], "'sb_ppl' is not a task attribution covers"),
        (["--threshold", "1.5"], "between 0 and 1"),
        (["--answer_tokens", "few"], "must be a number of tokens or all"),
        (["--answer_tokens", "0"], "--answer_tokens must be at least 1"),
        (["--lengths", "20"], "leaves no MQRAR query after 16 pairs"),
        (["--compare", "vllm:pretrained=x"], "must be NAME:ARGS with NAME one of sb_hf, hf"),
        (["--compare", "hf:pretrained=/no/such/folder"], "is not a local folder"),
        (["--lengths", "140000"], "exceeds the model's max_length"),
        (["--lengths", "400"], "sb_niah_single_1 at 400: max_seq_length=400 leaves 0 units of haystack"),
    ],
)
def test_bad_arguments_are_named(folders, tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(tmp_path / "data"))
    tasks = "mqrar" if arguments[:2] in (["--lengths", "140000"], ["--lengths", "20"]) else "sb_niah_single_1,sb_ruler_vt,mqrar"
    assert command(folders, tmp_path / "out", *arguments, tasks=tasks) == 2
    assert message in capsys.readouterr().err


def test_sb_hf_attributes_ruler_answers_in_an_lm_eval_run(folders, tmp_path):
    tokenizer = byte_level_tokenizer()
    doc = generate(TASKS["niah_single_1"], 900, tokenizer, 1, sizing="fill", use_cache=False)[0]
    path = tmp_path / "attribution.json"
    lm = StickBreakingLM(pretrained=str(folders["sb"]), device="cpu", batch_size=2, attribution=str(path), attribution_tokens=2)
    plain = StickBreakingLM(pretrained=str(folders["sb"]), device="cpu", batch_size=2)
    assert lm.get_model_info()["sb_attribution"] == str(path)

    def requests():
        gen_kwargs = {"until": ["\n\n"], "max_gen_toks": 4}
        return [
            Instance("generate_until", doc, (doc["input"], gen_kwargs), 0, ("sb_niah_single_1", 0, 1)),
            Instance("generate_until", {}, ("Once upon a time", gen_kwargs), 0, ("other_task", 0, 1)),
        ]

    assert lm.generate_until(requests()) == plain.generate_until(requests())  # answers unchanged
    written = json.loads(path.read_text())
    assert written["pretrained"] == str(folders["sb"]) and written["attention"] == "stick-breaking"
    [sample] = written["samples"]
    assert (sample["task"], sample["length"], sample["index"]) == ("sb_niah_single_1", 900, 0)
    assert sample["needles"][0]["answer"] == doc["outputs"][0]
    assert 1 <= len(sample["steps"]) <= 2
    lm.close()
    assert not lm.model.base_model._forward_pre_hooks
