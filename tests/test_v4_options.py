"""Options of ``dsv3lab.load`` / ``build`` on models outside the V3 layout either apply or are
refused by name, never silently ignored: DeepSeek-V4 (FP8 kept, another attention, expert paging,
absorbed prefill; MTP tensors the config does not explain, MTP asked of a model without it) and checkpoints with
fused experts (Mistral 4, GLM-5), where every option reaches the V3 loader."""

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3lab
from dsv3lab.checkpoint.v4 import save_v4
from dsv3lab.config import ConfigError
from dsv3lab.family import UnsupportedOption

X = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))


def _v4_dir(tmp_path, mtp=False):
    m = dsv3lab.build("v4-tiny", seed=0)
    d = save_v4(m, tmp_path / "v4")
    if mtp:      # mtp.0.* tensors a config without MTP blocks (num_nextn_predict_layers 0) does not explain
        (f,) = glob.glob(os.path.join(d, "*.safetensors"))
        t = load_file(f)
        D = m.cfg.hidden_size
        extra = {"mtp.0.e_proj.weight": torch.randn(D, D), "mtp.0.enorm.weight": torch.ones(D),
                 "mtp.0.attn.wq_a.weight": torch.randn(8, D)}
        save_file({**t, **extra}, f)
        idx = os.path.join(d, "model.safetensors.index.json")
        if os.path.exists(idx):
            j = json.load(open(idx))
            j["weight_map"].update({k: os.path.basename(f) for k in extra})
            json.dump(j, open(idx, "w"))
    return m, d


@pytest.mark.parametrize("kw, option", [(dict(fp8="keep"), "fp8='keep'"), (dict(fp8="quantize"), "fp8='quantize'"),
                                        (dict(attn_mode="naive"), "attn_mode='naive'"),
                                        (dict(max_memory=0.5), "max_memory=0.5")])
def test_v4_load_options_are_refused_by_name(tmp_path, kw, option):
    _, d = _v4_dir(tmp_path)
    with pytest.raises(UnsupportedOption, match=r"load\(" + option.replace("(", r"\(").replace(".", r"\.")):
        dsv3lab.load(d, **kw)


def test_v4_options_that_apply_work(tmp_path, capsys):
    m, d = _v4_dir(tmp_path)
    back = dsv3lab.load(d, attn_mode="v4", progress=True)
    assert "DeepSeek-V4" in capsys.readouterr().err
    with torch.no_grad():
        assert torch.equal(back(X), m(X))
    with pytest.raises(UnsupportedOption, match=r"build\(attn_mode='absorbed'\)"):
        dsv3lab.build("v4-tiny", attn_mode="absorbed")
    assert dsv3lab.build("v4-tiny", attn_mode="v4", device="meta").attn_mode == "v4"
    with pytest.raises(UnsupportedOption, match="absorb_prefill"):
        back.set_attn_mode(None, absorb_prefill=True)
    with pytest.raises(UnsupportedOption, match="attn_mode='sparse'"):
        back.new_cache(1, 8, mode="sparse")
    # the V3 reader and its ranked loader name the V4 type instead of listing the V3 ones
    from dsv3lab.parallel import Layout
    from dsv3lab.parallel.loading import load_sharded
    with pytest.raises(ConfigError, match="'deepseek_v4' is DeepSeek-V4"):
        load_sharded(d, Layout(), rank=0)


def test_v4_mtp_tensors_the_config_does_not_explain_and_a_model_without_mtp(tmp_path):
    """MTP blocks are built (tests/test_v4_mtp.py); mtp.* tensors beyond the config's
    num_nextn_predict_layers are refused by name, and a model without MTP blocks refuses
    speculative decoding and mtp_logits by name."""
    from dsv3lab.checkpoint.reader import CheckpointError
    m, d = _v4_dir(tmp_path, mtp=True)
    with pytest.raises(CheckpointError, match=r"3 tensor\(s\) the config does not explain.*mtp\.0\.attn\.wq_a"):
        dsv3lab.load(d)
    assert m.unused_mtp == [] and len(m.mtp) == 0
    with pytest.raises(ValueError, match="speculative decoding needs DeepSeek-V4's multi-token-prediction block"):
        m.generate([[1, 2, 3]], max_new_tokens=2, speculative=True)
    with pytest.raises(ValueError, match="mtp_logits needs .*num_nextn_predict_layers=0"):
        m.mtp_logits(torch.zeros(2, 19, 2, 64), X)


def test_fused_expert_checkpoints_take_every_load_option(tmp_path):
    """Mistral 4 and GLM-5 checkpoints (experts saved fused) go through the V3 loader with the
    caller's options: attention mode, FP8 mode, expert paging."""
    tr = pytest.importorskip("transformers")
    from test_dsa_shared import BASE, CASES, make_hf
    m, d = make_hf(tmp_path, "alternate")
    x = torch.randint(0, BASE["vocab_size"], (1, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m(x).logits
        dense = dsv3lab.load(d, dtype=torch.float32, attn_mode="absorbed")
        assert dense.attn_mode == "absorbed"
        paged = dsv3lab.load(d, dtype=torch.float32, fp8="keep", max_memory=0.0011)
        assert paged.pager is not None and paged._dsv3_load["fp8"] == "keep"
        assert (paged(x) - ref).abs().max().item() < 1e-5
        st = paged.pager.stats()
        assert st["requests"] > 0 and st["bytes_read"] > 0 and st["capacity_experts"] < 3 * 16   # paged, read when routed to
    assert tr is not None and CASES
