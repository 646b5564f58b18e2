"""Routed experts paged from the shards (``load(..., max_memory=GB)``, ``dsv3lab.paging``): the
same logits and greedy tokens as the model held whole, under a cap that forces evictions, with
and without prefetch; bad expert data is named when first read; a cap too small is refused."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3lab
from dsv3lab.checkpoint import CheckpointError
from dsv3lab.paging import PagedExpert


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    m = dsv3lab.build("tiny", seed=3)
    with torch.no_grad():
        for layer in m.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return dsv3lab.save(m, tmp_path_factory.mktemp("paging") / "fp8", fp8=True)


def cap_for(model_whole, n_experts: int) -> float:
    """A max_memory (GB) holding ``model_whole``'s dense part and ``n_experts`` of its experts."""
    cfg = model_whole.cfg
    s = model_whole._dsv3_load
    w = model_whole.layers[-1].mlp.experts[0].up_proj.weight
    routed = sum(p.numel() * p.element_size() for n, p in model_whole.named_parameters()
                 if ".experts." in n and n.endswith("proj.weight"))
    return (s["mapped"] + s["own"] - routed + n_experts * 3 * w.numel() * w.element_size()) / 1e9


@pytest.mark.parametrize("fp8", ["keep", "dequant"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_paged_model_generates_the_same_tokens(ckpt, fp8, prefetch):
    whole = dsv3lab.load(ckpt, dtype=torch.float32, fp8=fp8)
    cfg = whole.cfg
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    held = 3 * cfg.num_experts_per_tok                        # well under the n_moe * E experts
    cap = cap_for(whole, held)
    paged = dsv3lab.load(ckpt, dtype=torch.float32, fp8=fp8, max_memory=cap, prefetch=prefetch)
    assert any(isinstance(m, PagedExpert) for m in paged.modules())
    assert not any(".experts." in n for n, _ in paged.named_parameters())
    x = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(paged(x), whole(x), rtol=0, atol=1e-5)
    prompts = [[1, 2, 3, 4], [9, 8]]
    assert paged.generate(prompts, max_new_tokens=10) == whole.generate(prompts, max_new_tokens=10)
    s = paged.pager.stats()
    assert s["capacity_experts"] < n_moe * cfg.n_routed_experts
    assert s["resident_experts"] <= s["capacity_experts"]
    assert s["requests"] > 0 and s["bytes_read"] > 0 and 0 < s["hit_rate"] < 1
    if prefetch:
        assert s["prefetched"] > 0 and s["prefetch_used"] > 0
    else:
        assert s["prefetched"] == 0 and s["misses"] > 0
    paged.pager.close()


def test_cap_too_small_is_refused(ckpt):
    with pytest.raises(ValueError, match="paging needs at least"):
        dsv3lab.load(ckpt, fp8="keep", max_memory=1e-6)


def test_bad_expert_is_named_when_read(ckpt, tmp_path):
    d = shutil.copytree(ckpt, tmp_path / "c")
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    fn = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][key]
    t = load_file(str(d / fn))
    t[key].view(torch.uint8)[0, 0] = 0x7F                        # e4m3fn's NaN
    os.remove(d / fn)
    save_file(t, str(d / fn), metadata={"format": "pt"})
    whole = dsv3lab.load(ckpt, fp8="keep")
    paged = dsv3lab.load(d, fp8="keep", max_memory=cap_for(whole, 100))   # loads: experts unread
    with pytest.raises(CheckpointError, match="NaN"):
        for e in range(paged.cfg.n_routed_experts):
            paged.pager.get("layers.1.mlp", e)
    paged.pager.close()


def test_cli_generate_and_info_with_max_memory(ckpt, capsys):
    from dsv3lab.cli import main
    whole = dsv3lab.load(ckpt, fp8="keep")
    cap = str(cap_for(whole, 3 * whole.cfg.num_experts_per_tok))
    want = whole.generate([[1, 2, 3]], max_new_tokens=4)[0]
    assert main(["generate", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--fp8", "keep",
                 "--max-memory", cap]) == 0
    assert ",".join(map(str, want)) in capsys.readouterr().out
    assert main(["info", str(ckpt), "--load", "--fp8", "keep", "--max-memory", cap]) == 0
    out = capsys.readouterr().out
    assert "mapped from the shards" in out and "peak" in out
