"""Loading refuses every kind of bad checkpoint folder with one message naming file and field."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sb_eval.model.checks import CheckpointError, check_tokenizer_folder
from sb_eval.model.configuration import StickBreakingConfig, tiny_config
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.model.saving import write_random_checkpoint


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", tiny_config(n_layer=2))


@pytest.fixture
def folder(good_folder, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(good_folder, copy)
    return copy


def edit_config(folder, **fields):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def test_good_folder_loads(good_folder):
    model = AutoModelForCausalLM.from_pretrained(good_folder)
    assert isinstance(model, StickBreakingForCausalLM) and model.config.n_layer == 2


def test_other_model_type(folder):
    edit_config(folder, model_type="llama")
    with pytest.raises(CheckpointError, match=r"config.json: model_type is 'llama'.*--model hf"):
        StickBreakingForCausalLM.from_pretrained(folder)


def test_unsupported_config_field(folder):
    edit_config(folder, position_embedding_type="rope")
    with pytest.raises(CheckpointError, match="config.json: position_embedding_type is 'rope'"):
        StickBreakingForCausalLM.from_pretrained(folder)


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        StickBreakingForCausalLM.from_pretrained(folder)


def test_pickle_weights_need_opt_in(folder):
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*use_safetensors=False"):
        StickBreakingForCausalLM.from_pretrained(folder)
    model = StickBreakingForCausalLM.from_pretrained(folder, use_safetensors=False)
    assert torch.equal(model.transformer.wte.weight, weights["transformer.wte.weight"])


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors"):
        StickBreakingForCausalLM.from_pretrained(folder)


def test_missing_tensor(folder):
    weights = load_file(folder / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors lacks 1 tensor.*transformer.h.1.mlp.c_fc.weight"):
        StickBreakingForCausalLM.from_pretrained(folder)


def test_extra_layer_tensors(folder):
    edit_config(folder, n_layer=1)
    with pytest.raises(CheckpointError, match=r"does not describe: transformer.h.1.*n_layer=1"):
        StickBreakingForCausalLM.from_pretrained(folder)


def test_mismatched_shape_names_tensor_and_field(folder):
    edit_config(folder, n_inner=200)
    with pytest.raises(CheckpointError, match=r"transformer.h.0.mlp.c_fc.weight has shape \[512, 128\] but config.json implies \[400, 128\].*n_inner"):
        StickBreakingForCausalLM.from_pretrained(folder)


def test_missing_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.*tokenizer=PATH"):
        check_tokenizer_folder(folder)


def test_writer_refuses_to_overwrite(good_folder):
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        write_random_checkpoint(good_folder)


def test_writer_leaves_nothing_half_written(tmp_path, monkeypatch):
    def failing_tokenizer():
        raise RuntimeError("disk full")

    monkeypatch.setattr("sb_eval.model.saving.byte_level_tokenizer", failing_tokenizer)
    with pytest.raises(RuntimeError, match="disk full"):
        write_random_checkpoint(tmp_path / "ckpt", tiny_config(n_layer=1))
    assert list(tmp_path.iterdir()) == []


def test_released_3b_shapes_are_accepted():
    """The released checkpoint's config (docs/architecture.md, checkpoint format) builds the expected tensor shapes."""
    config = StickBreakingConfig(
        vocab_size=50304, n_embd=2304, n_head=36, n_layer=40, n_inner=9216, attention_multiplier=1 / 64,
        m_emb=12, m_residual=0.22, m_width=9, sb_remainder=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=50256,
    )
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in StickBreakingForCausalLM(config).state_dict().items()}
    assert shapes["transformer.h.39.attn.c_attn.weight"] == (3 * 2304, 2304)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (2 * 9216, 2304)
    assert "lm_head.weight" not in shapes and len(shapes) == 2 + 40 * 6
