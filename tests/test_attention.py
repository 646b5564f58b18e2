"""The attention seam: a variant registered in one place gets its own weights, its own cache state
and its own key selection in prefill and decode (checked against dense attention whose
probabilities are masked and renormalised by a hook, an independent path to the same numbers)."""

import pytest
import torch

import dsv3lab
from dsv3lab.model import mla as mla_mod
from dsv3lab.model.attention import keep_from_indices
from dsv3lab.model.attn_absorbed import AbsorbedAttention, LatentCache

WINDOW = 4


class WindowCache(LatentCache):
    """The latent plus one extra tensor per slot: the absolute position written into each row."""

    mode = "window"

    def __init__(self, cfg, n_layers, batch, max_len, dtype, device, n_heads=None):
        super().__init__(cfg, n_layers, batch, max_len, dtype, device, n_heads)
        self.positions = [torch.full((batch, max_len), -10 ** 6, dtype=torch.long, device=device)
                          for _ in range(n_layers)]

    def tensors(self):
        yield from super().tensors()
        yield from self.positions


class WindowAttention(AbsorbedAttention):
    """Each query sees only the keys less than WINDOW positions behind it, read from the cache's
    own position record (so the extra state has to be written and kept for decode to be right)."""

    name = "window"
    cache_cls = WindowCache

    @staticmethod
    def submodules(cfg, dtype=None, device=None):
        return {"toy_indexer": torch.nn.Linear(cfg.hidden_size, 2, bias=False, dtype=dtype, device=device)}

    def __call__(self, a, cache, slot):
        B, S = a.q_nope.shape[:2]
        pos_q = torch.arange(a.start, a.end)
        if cache is None:
            pos_k = torch.arange(a.end).expand(B, -1)
        else:
            cache.positions[slot][:B, a.start:a.end] = pos_q
            pos_k = cache.positions[slot][:B, :a.end]
        keep = (pos_q[None, :, None] - pos_k[:, None, :]) < WINDOW          # [B,S,T]
        return self.attend(a, self.write(a, cache, slot), keep)


@pytest.fixture
def window_model(monkeypatch):
    monkeypatch.setitem(mla_mod.ATTENTION, "window", WindowAttention)
    return dsv3lab.build("tiny", seed=0)


def windowed_reference(model, x):
    """Dense absorbed attention; a hook zeroes the probabilities outside the window and
    renormalises each row (softmax over a subset = renormalised softmax restricted to it)."""
    def renorm(mod, args, probs):                                           # [B,H,S,T]
        S, T = probs.shape[-2:]
        q = torch.arange(T - S, T)[:, None]
        k = torch.arange(T)[None, :]
        p = probs * ((q - k) < WINDOW)
        return p / p.sum(-1, keepdim=True)

    model.set_attn_mode("absorbed")
    hooks = [m.hook_attn_probs.register_forward_hook(renorm)
             for m in model.modules() if isinstance(m, mla_mod.MLA)]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_variant_has_its_weights_under_self_attn(window_model):
    keys = window_model.state_dict()
    assert "layers.0.self_attn.toy_indexer.weight" in keys
    assert keys["layers.0.self_attn.toy_indexer.weight"].shape == (2, window_model.cfg.hidden_size)


@pytest.mark.parametrize("absorb_prefill", [False, True])
def test_variant_selection_in_prefill_and_decode(window_model, absorb_prefill):
    m = window_model
    x = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(2))
    ref = windowed_reference(m, x)
    dense = m(x)
    m.set_attn_mode("window", absorb_prefill=absorb_prefill)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 24)
        assert isinstance(cache, WindowCache)
        parts = [m(x[:, :6], start=0, cache=cache), m(x[:, 6:9], start=6, cache=cache)]
        parts += [m(x[:, t:t + 1], start=t, cache=cache) for t in range(9, 17)]
    assert rel(full, ref) < 1e-5
    assert rel(torch.cat(parts, 1), ref) < 1e-5
    assert rel(dense, ref) > 1e-3                      # the window really changes the result
    n_slots = m.cfg.num_hidden_layers + m.cfg.num_nextn_predict_layers
    latent = n_slots * 2 * 24 * (m.cfg.kv_lora_rank + m.cfg.qk_rope_head_dim) * 4
    assert cache.nbytes() == latent + n_slots * 2 * 24 * 8        # the extra state is counted
    assert torch.equal(cache.positions[0][0, :17], torch.arange(17))


def test_wrong_cache_kind_and_unknown_mode_are_named():
    m = dsv3lab.build("tiny", seed=0)
    cache = m.new_cache(1, 8, mode="naive")
    m.set_attn_mode("absorbed")
    with pytest.raises(ValueError, match="KVCache.*'naive'.*'absorbed'"):
        m(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match=r"attn_mode must be one of \['absorbed', 'naive', 'sparse'\], got 'flash'"):
        m.set_attn_mode("flash")
    with pytest.raises(ValueError, match="'sparse' attention needs the V3.2 indexer"):
        m.set_attn_mode("sparse")                  # tiny has no indexer
    assert m.attn_mode == "absorbed"
    with pytest.raises(ValueError, match="holds 1 sequences"):
        m(torch.tensor([[1], [2]]), cache=m.new_cache(1, 8))


def test_keep_from_indices_and_empty_selection():
    idx = torch.tensor([[[0, 2, -1], [1, -1, -1]]])                         # [B=1, S=2, k=3]
    keep = keep_from_indices(idx, 4)
    assert torch.equal(keep, torch.tensor([[[True, False, True, False], [False, True, False, False]]]))
    from dsv3lab.model.attention import allowed
    with pytest.raises(ValueError, match="no key"):
        allowed(2, 2, torch.zeros(1, 2, 4, dtype=torch.bool), "cpu")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_latent_decode_matches_reference(dtype, tol):
    """The one-pass decode (flash attention, the latent as one shared key/value head) against
    the fp32 einsum reference, on a strided view of a preallocated cache as the engine uses."""
    from dsv3lab.kernels.mla_attention import mla_decode_ref
    from dsv3lab.model.attn_absorbed import latent_attention
    g = torch.Generator().manual_seed(0)
    B, H, c, r, T = 2, 4, 32, 8, 37
    buf = torch.randn(B, 50, c + r, generator=g).to(dtype)
    q = torch.randn(B, 1, H, c + r, generator=g).to(dtype)
    with torch.no_grad():
        got = latent_attention(q, buf[:, :T], 0.3, c, start=T - 1)
    assert got.shape == (B, 1, H, c)
    ref = mla_decode_ref(q[:, 0], buf[:, :T], 0.3, c)
    assert rel(got[:, 0].float(), ref) < tol


def test_fused_decode_equals_explicit_path_in_the_model():
    """A hook on hook_attn_probs sends decode through the explicit two-matmul path; both paths
    give the same logits."""
    m = dsv3lab.build("tiny", seed=0)
    x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    outs = []
    for hooked in (False, True):
        hooks = [mm.hook_attn_probs.register_forward_hook(lambda mod, a, p: p)
                 for mm in m.modules() if isinstance(mm, mla_mod.MLA)] if hooked else []
        with torch.no_grad():
            cache = m.new_cache(2, 16)
            m(x[:, :8], cache=cache)
            outs.append(torch.cat([m(x[:, t:t + 1], start=t, cache=cache) for t in range(8, 12)], 1))
        for h in hooks:
            h.remove()
    assert rel(outs[0], outs[1]) < 1e-5
