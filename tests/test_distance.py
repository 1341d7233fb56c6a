"""`sb-eval distance` on tiny checkpoints: its numbers against explicit float64 attention matrices,
its files, its windows and its errors."""

import json

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_module
from test_attention_stats import assert_statistics_match, explicit_statistics, softmax_matrix, stick_breaking_matrix
from tiny_models import write_tiny_llama

import sb_eval.model.modeling
from sb_eval.commands.distance import main
from sb_eval.harness.distance import token_windows
from sb_eval.model.configuration import tiny_config
from sb_eval.model.saving import write_random_checkpoint
from sb_eval.tokenization import byte_level_tokenizer

LENGTH = 40
DOCUMENTS = {
    "a.txt": "Stick-breaking attention breaks the stick nearest first. " * 3,  # 171 bytes: 4 windows
    "b.jsonl": json.dumps({"text": "Softmax attention spreads its weight over every key. " * 2}) + "\n",  # 106: 2
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("distance")
    sb = write_random_checkpoint(root / "sb", tiny_config(n_layer=2, n_embd=64, n_inner=96), seed=11)
    write_tiny_llama(
        root / "llama", seed=12, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in DOCUMENTS.items():
        (corpus / name).write_text(text)
    return {"sb": sb, "llama": root / "llama", "corpus": corpus}


def test_windows_are_cut_per_document():
    texts = ["abcdefghij", "xyz", "0123456"]
    windows = token_windows(texts, byte_level_tokenizer(), 3, 5)
    assert windows == [list(b"abc"), list(b"def"), list(b"ghi"), list(b"xyz"), list(b"012")]
    assert token_windows(texts, byte_level_tokenizer(), 3, 100)[-1] == list(b"345")
    joined = token_windows(texts, byte_level_tokenizer(), 4, 100, join=True)
    assert joined == [list(b"abcd"), list(b"efgh"), list(b"ijxy"), list(b"z012"), list(b"3456")]


def test_distance_command_matches_explicit_matrices(folders, tmp_path, monkeypatch):
    calls = {"sb": [], "hf": []}
    sb_attention = sb_eval.model.modeling.stickbreaking_attention
    sdpa = sdpa_module.sdpa_attention_forward

    def sb_recording(q, k, v, **kwargs):
        calls["sb"].append((q, k))
        return sb_attention(q, k, v, **kwargs)

    def sdpa_recording(module, query, key, *args, **kwargs):
        calls["hf"].append((query, key))
        return sdpa(module, query, key, *args, **kwargs)

    monkeypatch.setattr(sb_eval.model.modeling, "stickbreaking_attention", sb_recording)
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", sdpa_recording)
    out = tmp_path / "out"
    code = main([
        "--model", "sb_hf", "--model_args", f"pretrained={folders['sb']}",
        "--compare", f"hf:pretrained={folders['llama']}",
        "--corpus", str(folders["corpus"]), "--length", str(LENGTH), "--windows", "5",
        "--positions", "all", "--remainder", "farthest", "--batch_size", "5", "--device", "cpu",
        "--output", str(out),
    ])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison.png", "hf-llama.json", "hf-llama.png", "sb_hf-sb.json", "sb_hf-sb.png", "summary.md",
    ]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    T = LENGTH
    j, i = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for label, kind, visible, scale in (
        ("sb_hf-sb", "sb", (i < j)[None, None], 1 / 32),
        ("hf-llama", "hf", (i <= j)[None, None], 16 ** -0.5),
    ):
        result = json.loads((out / f"{label}.json").read_text())
        assert (result["windows"], result["length"], result["positions"]) == (5, LENGTH, "all")
        statistics = result["statistics"]
        # sb: position 0 sees no key and is not counted
        assert statistics["queries"] == [[5 * (T - 1 if kind == "sb" else T)] * 4] * 2
        assert len(calls[kind]) == 2  # one batch of 5 windows, two layers
        counted = visible.any(-1)[:, 0].expand(5, T)
        matrix = stick_breaking_matrix if kind == "sb" else softmax_matrix
        expected = [
            explicit_statistics(matrix(q, k, scale, visible), torch.arange(T), visible, counted)
            for q, k in calls[kind]
        ]
        assert_statistics_match(statistics, expected)
        mean = result["model_mean"]
        assert mean["tokens_back"] == statistics["model_mean"]["tokens_back"]["farthest"]
        assert mean["signed_distance"] == -mean["tokens_back"]
        summary = (out / "summary.md").read_text()
        assert f"| {label} | 5 | {mean['tokens_back']:.1f} | {-mean['tokens_back']:.1f} |" in summary


def test_last_position_of_one_model(folders, tmp_path):
    out = tmp_path / "out"
    code = main([
        "--model_args", f"pretrained={folders['sb']}", "--corpus", str(folders["corpus"] / "a.txt"),
        "--length", str(LENGTH), "--windows", "10", "--device", "cpu", "--output", str(out),
    ])
    assert code == 0
    result = json.loads((out / "sb_hf-sb.json").read_text())
    assert (result["windows"], result["positions"], result["remainder"]) == (4, "last", "ignore")
    assert result["statistics"]["queries"] == [[4] * 4] * 2
    assert result["statistics"]["forward_passes"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["sb_hf-sb.json", "sb_hf-sb.png", "summary.md"]


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--length", "400"], "no document of the corpus has 400 tokens"),
        (["--length", "400", "--join_documents"], "the whole corpus has 400 tokens"),
        (["--length", "1"], "--length must be at least 2"),
        (["--compare", "vllm:pretrained=x"], "must be NAME:ARGS with NAME one of sb_hf, hf"),
        (["--compare", "hf:pretrained=/no/such/folder"], "is not a local folder"),
    ],
)
def test_bad_arguments_are_named(folders, tmp_path, capsys, arguments, message):
    argv = [
        "--model_args", f"pretrained={folders['sb']}", "--corpus", str(folders["corpus"]),
        "--length", str(LENGTH), "--device", "cpu", "--output", str(tmp_path / "out"),
    ]
    assert main(argv + arguments) == 2
    assert message in capsys.readouterr().err


def test_an_unsupported_architecture_is_named_and_the_other_model_still_reported(folders, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    torch.manual_seed(13)
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=256, eos_token_id=256)).save_pretrained(gpt2)
    byte_level_tokenizer().save_pretrained(gpt2)
    common = ["--corpus", str(folders["corpus"]), "--length", str(LENGTH), "--windows", "2", "--device", "cpu"]

    alone = tmp_path / "alone"
    assert main(["--model", "hf", "--model_args", f"pretrained={gpt2}", *common, "--output", str(alone)]) == 2
    error = capsys.readouterr().err
    assert f"sb-eval distance: error: hf with pretrained={gpt2}: GPT2LMHeadModel:" in error
    assert "support stick-breaking checkpoints (sb_hf) and transformers decoders" in error
    assert "Traceback" not in error and not (alone / "summary.md").exists()

    out = tmp_path / "out"
    code = main(["--model_args", f"pretrained={folders['sb']}", "--compare", f"hf:pretrained={gpt2}",
                 *common, "--output", str(out)])
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == ["sb_hf-sb.json", "sb_hf-sb.png", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "| sb_hf-sb | 2 |" in summary
    assert "- hf-gpt2: GPT2LMHeadModel: found 0 attention modules" in summary
