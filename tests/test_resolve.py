"""Name -> config / model resolution, the DSV3LAB_MODEL lookup, and the shared CLI arguments."""

import json

import pytest
import torch

import dsv3lab
from dsv3lab import resolve
from dsv3lab.cli.args import parse_dtype, token_ids
from dsv3lab.tokenizer import TextCodec


def test_resolve_config(tmp_path):
    assert resolve.resolve_config("v3-671b").n_routed_experts == 256
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dsv3lab.ModelConfig.preset("tiny").to_hf()))
    assert resolve.resolve_config(str(d)).hidden_size == dsv3lab.ModelConfig.preset("tiny").hidden_size
    assert resolve.resolve_config(str(d / "config.json")).num_hidden_layers == dsv3lab.ModelConfig.preset("tiny").num_hidden_layers
    with pytest.raises(ValueError, match="neither a preset"):
        resolve.resolve_config("no-such-model")


def test_resolve_model_preset_and_dir(tmp_path):
    model, codec = resolve.resolve_model("tiny")
    assert isinstance(codec, TextCodec) and codec.tokenizer is None
    assert codec.encode("ab") == [97, 98] and codec.pieces([97, 3]) == ["a", "<3>"]
    dsv3lab.save(model, str(tmp_path / "ck"))
    loaded, codec2 = resolve.resolve_model(str(tmp_path / "ck"), dtype=torch.float32)
    assert not loaded.training and codec2.tokenizer is None            # no tokenizer.json: bytes
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded(tokens), model(tokens), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        resolve.resolve_model(str(tmp_path / "missing"))


def test_default_model_dir_and_lab_model(tmp_path, monkeypatch):
    monkeypatch.setattr(resolve, "repo_root", lambda: str(tmp_path / "repo"))   # no data/lab-model there
    monkeypatch.delenv("DSV3LAB_MODEL", raising=False)
    assert resolve.default_model_dir() is None
    model, codec, source = dsv3lab.lab_model("tiny")
    assert "built 'tiny' preset" in source and model.cfg.name == "tiny" and not model.training
    monkeypatch.setenv("DSV3LAB_MODEL", str(tmp_path / "nothing-here"))        # not a checkpoint
    assert resolve.default_model_dir() is None
    ck = tmp_path / "repo" / "data" / "lab-model"
    dsv3lab.save(dsv3lab.build("tiny", seed=1), str(ck))
    assert resolve.default_model_dir() == str(ck)                               # the repository's
    other = tmp_path / "other"
    dsv3lab.save(dsv3lab.build("tiny", seed=2), str(other))
    monkeypatch.setenv("DSV3LAB_MODEL", str(other))
    assert resolve.default_model_dir() == str(other)                            # the variable wins
    model, codec, source = dsv3lab.lab_model()
    assert source == str(other) and model.dtype == torch.float32


def test_cli_args():
    assert token_ids("1, 2,3,") == [1, 2, 3]
    with pytest.raises(ValueError, match="comma-separated integers"):
        token_ids("1,x")
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'fp7'"):
        parse_dtype("fp7")
