"""ModelConfig: every DeepSeek-V2/V3-family hyper-parameter, documented once, with named presets.

Field names follow the Hugging Face ``config.json`` of ``deepseek-ai/DeepSeek-V3`` so that
``from_hf``/``to_hf`` are a near-identity; the official demo's names are given in brackets.
``from_hf`` reads the model types of the family: ``deepseek_v3`` (V3, V3.1, R1, Moonlight),
``kimi_k2`` (Kimi K2: the V3 architecture under another name), ``deepseek_v32`` (V3.2: V3 plus
the lightning indexer of DeepSeek Sparse Attention) and ``deepseek_v2`` (docs/checkpoints.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional


class ConfigError(ValueError):
    """A config field is missing, unknown or inconsistent with another one."""


# how the router limits groups (``Gate``): per model type as transformers 5.24 routes
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy", "group_top2")


# annotation (a string under `from __future__ import annotations`) -> accepted Python types
_FIELD_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                "Optional[int]": (int,), "Optional[str]": (str,), "Optional[dict]": (dict,)}


@dataclass(frozen=True)
class ModelConfig:
    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 129280            # [vocab_size] token embeddings and head rows
    hidden_size: int = 7168             # [dim] residual stream width D
    intermediate_size: int = 18432      # [inter_dim] SwiGLU width of the dense first layers
    moe_intermediate_size: int = 2048   # [moe_inter_dim] SwiGLU width of one routed expert
    num_hidden_layers: int = 61         # [n_layers] main-model blocks (MTP blocks come after)
    first_k_dense_replace: int = 3      # [n_dense_layers] blocks [0, k) use a dense FFN
    num_attention_heads: int = 128      # [n_heads] H
    # --- MoE ---------------------------------------------------------------------------------
    n_routed_experts: int = 256         # [n_routed_experts] E
    n_shared_experts: int = 1           # shared SwiGLU width = n_shared * moe_intermediate_size
    num_experts_per_tok: int = 8        # [n_activated_experts] top-k
    n_group: int = 8                    # [n_expert_groups] E/G contiguous experts per group
    topk_group: int = 4                 # [n_limited_groups] groups a token may use (node limit M)
    scoring_func: str = "sigmoid"       # [score_func] "sigmoid" (V3) or "softmax" (V2)
    # "noaux_tc": bias + top-2-sum groups; "greedy": no groups (n_group ignored, as transformers' V2);
    # "group_limited_greedy": max-score groups (V2); "group_top2": top-2-sum groups, no bias (Mistral 4)
    topk_method: str = "noaux_tc"
    routed_scaling_factor: float = 2.5  # [route_scale] multiplies the routing weights
    norm_topk_prob: bool = True         # renormalise the chosen weights to sum to 1 (sigmoid)
    # --- MLA ---------------------------------------------------------------------------------
    q_lora_rank: int = 1536             # 0 means a single full-rank q_proj (V2-Lite)
    kv_lora_rank: int = 512             # latent width cached per token
    qk_nope_head_dim: int = 128         # per-head query/key part without RoPE
    qk_rope_head_dim: int = 64          # per-head RoPE part; the key part is shared by all heads
    v_head_dim: int = 128               # per-head value width
    # --- positions ---------------------------------------------------------------------------
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = field(default_factory=lambda: dict(
        type="yarn", factor=40.0, original_max_position_embeddings=4096,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
    # --- misc --------------------------------------------------------------------------------
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1   # MTP depth D; stored at layer index num_hidden_layers
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006
    # FP8 weights in the checkpoint: None, or the square block size (128) of weight_scale_inv
    fp8_block_size: Optional[int] = 128
    # quantization_config.scale_fmt: None (any fp32 scale) or "ue8m0" (V3.1 on: every scale a
    # power of two, on activations and on the stored weight_scale_inv alike)
    scale_fmt: Optional[str] = None
    # --- DeepSeek Sparse Attention (V3.2's lightning indexer); 0 = no indexer ---------------
    index_n_heads: int = 0              # [index_n_heads] H_I indexer heads
    index_head_dim: int = 0             # [index_head_dim] D_I per indexer head (rope part first)
    index_topk: int = 0                 # [index_topk] keys each query may attend to
    # GLM-5 (glm_moe_dsa): per layer "full" (runs its indexer) or "shared" (no indexer; reuses the
    # selection of the last full layer before it); None = every layer full (V3.2). MTP blocks are full.
    indexer_types: Optional[tuple] = None
    index_rope_interleave: bool = False  # the indexer's RoPE on pairs (2i, 2i+1) (GLM-5), not V3.2's (i, i + r/2)
    # --- Mistral 4 (mistral4): queries at position t scaled by 1 + beta ln(1 + floor(t / len)),
    # rope_parameters.llama_4_scaling_beta and its original_max_position_embeddings; 0 = off
    attn_scale_beta: float = 0.0
    attn_scale_len: int = 0
    name: str = "v3-671b"               # label only

    # ----------------------------------------------------------------------------------------
    def __post_init__(self):
        if self.indexer_types is not None:
            if not isinstance(self.indexer_types, (list, tuple)):
                raise ConfigError(f"ModelConfig.indexer_types: must be a list of 'full' / 'shared', "
                                  f"got {type(self.indexer_types).__name__} {self.indexer_types!r}")
            # a tuple (hashable, comparable); every layer full is the V3.2 default, written None
            types = tuple(self.indexer_types)
            object.__setattr__(self, "indexer_types", None if all(t == "full" for t in types) else types)
        self.validate()

    def validate(self) -> None:
        def need(cond, fld, msg):
            if not cond:
                raise ConfigError(f"ModelConfig.{fld}: {msg}")

        # types first, so that a string or a float from a hand-edited config.json is named here
        # instead of failing later inside int() or torch
        for f in fields(self):
            v = getattr(self, f.name)
            want = _FIELD_TYPES.get(f.type)
            if want is None or (v is None and f.type.startswith("Optional")):
                continue
            ok = isinstance(v, want) and not (isinstance(v, bool) and bool not in want)
            need(ok, f.name, f"must be {f.type.replace('Optional[', 'None or ').rstrip(']')}, "
                 f"got {type(v).__name__} {v!r}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                  "v_head_dim"):
            need(int(getattr(self, f)) > 0, f, f"must be > 0, got {getattr(self, f)}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"must be even (rotated in pairs), got {self.qk_rope_head_dim}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be in [0, num_hidden_layers={self.num_hidden_layers}], got {self.first_k_dense_replace}")
        need(self.scoring_func in ("sigmoid", "softmax"), "scoring_func",
             f"must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        need(self.topk_method in TOPK_METHODS, "topk_method",
             f"must be one of {', '.join(repr(m) for m in TOPK_METHODS)}, got {self.topk_method!r}")
        need(self.q_lora_rank >= 0, "q_lora_rank", f"must be >= 0, got {self.q_lora_rank}")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.n_shared_experts >= 0, "n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        need(self.initializer_range >= 0, "initializer_range", f"must be >= 0, got {self.initializer_range}")
        need(self.max_position_embeddings > 0, "max_position_embeddings",
             f"must be > 0, got {self.max_position_embeddings}")
        need(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor",
             f"must be > 0, got {self.routed_scaling_factor}")
        need(self.fp8_block_size is None or self.fp8_block_size > 0, "fp8_block_size",
             f"must be None or > 0, got {self.fp8_block_size}")
        need(self.scale_fmt in (None, "ue8m0"), "scale_fmt", f"must be None or 'ue8m0', got {self.scale_fmt!r}")
        for f in ("index_n_heads", "index_head_dim", "index_topk"):
            need(getattr(self, f) >= 0, f, f"must be >= 0 (0: no indexer), got {getattr(self, f)}")
        dsa = (self.index_n_heads, self.index_head_dim, self.index_topk)
        if any(dsa):
            for f, v in zip(("index_n_heads", "index_head_dim", "index_topk"), dsa):
                need(v > 0, f, "the indexer needs index_n_heads, index_head_dim and index_topk all > 0 "
                     f"(or all 0 for none), got {v}")
            need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim",
                 f"must hold the qk_rope_head_dim={self.qk_rope_head_dim} rotated dims, got {self.index_head_dim}")
            need(self.q_lora_rank > 0, "q_lora_rank", "the indexer reads the q latent: needs q_lora_rank > 0")
        if self.indexer_types is not None:
            types = self.indexer_types
            need(self.has_indexer, "indexer_types", "needs an indexer (index_topk > 0)")
            need(len(types) == self.num_hidden_layers, "indexer_types",
                 f"needs one entry per layer ({self.num_hidden_layers}), got {len(types)}")
            bad = [t for t in types if t not in ("full", "shared")]
            need(not bad, "indexer_types", f"entries must be 'full' or 'shared', got {bad[:3]}")
            need(types[0] == "full", "indexer_types", "layer 0 must be 'full' (a shared layer reuses an "
                 "earlier layer's selection)")
        need(not self.index_rope_interleave or self.has_indexer, "index_rope_interleave",
             "needs an indexer (index_topk > 0)")
        need(self.attn_scale_beta >= 0, "attn_scale_beta", f"must be >= 0, got {self.attn_scale_beta}")
        need(not self.attn_scale_beta or self.attn_scale_len > 0, "attn_scale_len",
             f"must be > 0 when attn_scale_beta is set, got {self.attn_scale_len}")
        if self.has_moe:
            need(self.n_routed_experts > 0, "n_routed_experts", "must be > 0 when any layer is MoE")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"must be in [1, n_routed_experts={self.n_routed_experts}], got {self.num_experts_per_tok}")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"n_routed_experts={self.n_routed_experts} must divide into n_group={self.n_group} groups")
            need(1 <= self.topk_group <= self.n_group, "topk_group",
                 f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method in ("noaux_tc", "group_top2") and self.n_group > 1:
                need(per_group >= 2, "n_group", f"{self.topk_method} scores groups by their top-2 experts: "
                     f"needs >= 2 experts per group, got {per_group}")
            need(self.topk_method == "greedy" or self.topk_group * per_group >= self.num_experts_per_tok, "topk_group",
                 f"topk_group={self.topk_group} groups of {per_group} experts cannot hold "
                 f"num_experts_per_tok={self.num_experts_per_tok}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0")
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(rtype in ("yarn", "default", None), "rope_scaling",
                 f"only 'yarn' scaling is supported, got type {rtype!r}")
            if rtype == "yarn":
                need(float(self.rope_scaling.get("factor", 1.0)) >= 1.0, "rope_scaling.factor", "must be >= 1")

    # --- derived -----------------------------------------------------------------------------
    @property
    def has_moe(self) -> bool:
        return self.first_k_dense_replace < self.num_hidden_layers or self.num_nextn_predict_layers > 0

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> Optional[dict]:
        """The YaRN parameters, or None when positions are plain RoPE."""
        rs = self.rope_scaling
        if rs is None or rs.get("type", rs.get("rope_type")) != "yarn":
            return None
        return dict(factor=float(rs.get("factor", 1.0)),
                    original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 4096)),
                    beta_fast=float(rs.get("beta_fast", 32)), beta_slow=float(rs.get("beta_slow", 1)),
                    mscale=float(rs.get("mscale", 1.0)), mscale_all_dim=float(rs.get("mscale_all_dim", 0.0)))

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5 * m^2 with m = 0.1 * mscale_all_dim * ln(factor) + 1 under YaRN."""
        scale = self.qk_head_dim ** -0.5
        y = self.yarn
        if y is not None and y["mscale_all_dim"] and y["factor"] > 1:
            m = 0.1 * y["mscale_all_dim"] * math.log(y["factor"]) + 1.0
            scale = scale * m * m
        return scale

    def __hash__(self) -> int:
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @property
    def has_indexer(self) -> bool:
        """DeepSeek Sparse Attention: a lightning indexer in every layer (V3.2)."""
        return self.index_topk > 0

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def indexer_shared(self, layer: int) -> bool:
        """Layer ``layer`` has no indexer and reuses ``index_source(layer)``'s selection (GLM-5)."""
        return self.indexer_types is not None and layer < len(self.indexer_types) \
            and self.indexer_types[layer] == "shared"

    def index_source(self, layer: int) -> int:
        """The layer whose indexer selects the keys of ``layer``: itself, or for a shared layer the
        last full layer before it."""
        while self.indexer_shared(layer):
            layer -= 1
        return layer

    @property
    def n_indexer_layers(self) -> int:
        """Main layers that run an indexer (and cache its keys)."""
        if not self.has_indexer:
            return 0
        return sum(not self.indexer_shared(i) for i in range(self.num_hidden_layers))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # --- presets -----------------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @staticmethod
    def presets() -> list[str]:
        return sorted(PRESETS)

    # --- HF config.json ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: Any) -> "ModelConfig":
        """Read an HF ``config.json`` (path, directory or dict) of a model type in MODEL_TYPES."""
        src = "dict"
        if isinstance(path_or_dict, (str, os.PathLike)):
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            src = p
            if not os.path.exists(p):
                raise ConfigError(f"{p}: no config.json")
            try:
                with open(p) as f:
                    d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: not valid JSON ({e})") from None
        else:
            d = dict(path_or_dict)
        mt = d.get("model_type")
        why = refusal(d)
        if why is not None:
            raise UnsupportedModelType(f"{src}: model_type {mt!r} is not supported: {why}")
        if mt == "deepseek_v4":
            raise ConfigError(f"{src}: model_type 'deepseek_v4' is DeepSeek-V4, read by V4Config.from_hf and loaded "
                              "by dsv3lab.load (the V4 engine); this is the V3 family's reader (ModelConfig), "
                              "which its ranked loader (dsv3lab.parallel.load_sharded) uses too")
        if mt not in MODEL_TYPES:
            raise ConfigError(f"{src}: model_type must be one of {', '.join(repr(m) for m in MODEL_TYPES)}, "
                              f"got {mt!r}")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k not in ("rope_scaling", "name", "scale_fmt")
              and not k.startswith(("index_", "attn_scale_", "indexer_"))}
        if mt == "deepseek_v32":
            # transformers' DeepseekV32Config defaults (the official 671B values) when a field is absent
            for k, default in (("index_n_heads", 64), ("index_head_dim", 128), ("index_topk", 2048)):
                kw[k] = d[k] if d.get(k) is not None else default
        if mt == "glm_moe_dsa":
            # GLM-5: V3.2's DSA with the indexer's RoPE interleaved and layers that reuse the last
            # full layer's selection; GlmMoeDsaConfig's defaults when a field is absent
            for k, default in (("index_n_heads", 32), ("index_head_dim", 128), ("index_topk", 2048)):
                kw[k] = d[k] if d.get(k) is not None else default
            kw["indexer_types"] = glm_indexer_types(d)
            kw["index_rope_interleave"] = True
            kw.setdefault("first_k_dense_replace", 3)
        # transformers 5.x writes rope_parameters (with rope_type) instead of rope_scaling
        rs = d.get("rope_scaling") or d.get("rope_parameters")
        if rs:
            rs = dict(rs)
            rtype = rs.pop("rope_type", None)
            rtype = rs.pop("type", None) or rtype
            rs.pop("rope_theta", None)
            if "rope_theta" not in d and "rope_parameters" in d and "rope_theta" in d["rope_parameters"]:
                kw["rope_theta"] = d["rope_parameters"]["rope_theta"]
            kw["rope_scaling"] = None if rtype in (None, "default") else dict(type=rtype, **rs)
        else:
            kw["rope_scaling"] = None
        if kw.get("q_lora_rank") is None:
            kw["q_lora_rank"] = 0
        if d.get("num_nextn_predict_layers") is None and "num_mtp_layers" in d:
            kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
        kw.setdefault("num_nextn_predict_layers", 0)
        if d.get("rope_interleave") is False:
            raise UnsupportedModelType(f"{src}: rope_interleave=false (half-split RoPE on MLA) is not supported")
        if d.get("mlp_layer_types"):
            # GLM-4-MoE-Lite's and A.X K1's per-layer schedule: dense layers first, then MoE
            types = list(d["mlp_layer_types"])
            k = types.count("dense")
            if types != ["dense"] * k + ["sparse"] * (len(types) - k) or len(types) != d.get("num_hidden_layers"):
                raise UnsupportedModelType(f"{src}: mlp_layer_types other than dense layers first, then sparse, "
                                           "are not supported")
            kw["first_k_dense_replace"] = k
        if mt == "mistral4":
            # Mistral 4: V3's MLA and MoE with a softmax router without bias (top-k over all experts
            # in one group), and llama-4 query scaling (docs/family.md)
            rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
            if d.get("rope_interleave") is False:
                raise UnsupportedModelType(f"{src}: mistral4 with rope_interleave=false (half-split RoPE on "
                                           "MLA) is not supported")
            # groups, when there are several, scored by their top-2 softmax scores (no bias)
            kw.update(scoring_func="softmax", topk_method="group_top2" if (d.get("n_group") or 1) > 1 else "greedy",
                      norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                      attn_scale_beta=float(rp.get("llama_4_scaling_beta") or 0.0),
                      attn_scale_len=int(rp.get("original_max_position_embeddings") or 0))
            if kw.get("rope_scaling"):
                kw["rope_scaling"] = {k: v for k, v in kw["rope_scaling"].items() if k in (
                    "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                    "mscale_all_dim")}
        if mt == "deepseek_v2":
            kw.setdefault("scoring_func", d.get("scoring_func", "softmax"))
            kw.setdefault("topk_method", d.get("topk_method", "greedy"))
            kw.setdefault("norm_topk_prob", d.get("norm_topk_prob", False))
            kw.setdefault("routed_scaling_factor", d.get("routed_scaling_factor", 1.0))
        if kw.get("n_group") is None:
            kw["n_group"] = 1
        if kw.get("topk_group") is None:
            kw["topk_group"] = 1
        if kw.get("n_shared_experts") is None:
            kw["n_shared_experts"] = 0
        qc = d.get("quantization_config")
        if qc:
            if qc.get("quant_method") != "fp8":
                raise ConfigError(f"{src}: quantization_config.quant_method {qc.get('quant_method')!r} "
                                  "is not supported (only 'fp8')")
            bs = qc.get("weight_block_size", [128, 128])
            if len(bs) != 2 or bs[0] != bs[1]:
                raise ConfigError(f"{src}: quantization_config.weight_block_size must be square, got {bs}")
            kw["fp8_block_size"] = int(bs[0])
            kw["scale_fmt"] = qc.get("scale_fmt")
        else:
            kw["fp8_block_size"] = None
        for k in ("eos_token_id", "bos_token_id"):
            if isinstance(kw.get(k), list):
                kw[k] = kw[k][0]
            if kw.get(k) is None:
                kw.pop(k, None)
        kw["name"] = os.path.basename(os.path.dirname(src)) if src != "dict" else "hf"
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{src}: {e}") from None

    def to_hf(self) -> dict:
        """The HF ``config.json`` dict (DeepseekV3 style; V2-style configs keep their gate)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("name", "fp8_block_size", "scale_fmt"):
            d.pop(k)
        if not self.has_indexer:
            for k in ("index_n_heads", "index_head_dim", "index_topk"):
                d.pop(k)
        glm = d.pop("index_rope_interleave")
        types = d.pop("indexer_types")
        if types is not None and not glm:
            raise ConfigError("ModelConfig.indexer_types: shared indexer layers with V3.2's half-split "
                              "indexer RoPE have no transformers model type (glm_moe_dsa interleaves)")
        beta, blen = d.pop("attn_scale_beta"), d.pop("attn_scale_len")
        d["q_lora_rank"] = self.q_lora_rank or None
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        # kimi_k2 configs are read as the architecture they are and written as deepseek_v3, the
        # name transformers' native class loads
        mt, arch = ("deepseek_v32", "DeepseekV32ForCausalLM") if self.has_indexer else \
            ("deepseek_v3", "DeepseekV3ForCausalLM")
        d.update(model_type=mt, architectures=[arch],
                 num_key_value_heads=self.num_attention_heads, hidden_act="silu",
                 attention_bias=False, attention_dropout=0.0, moe_layer_freq=1, ep_size=1,
                 use_cache=True, torch_dtype="bfloat16")
        if self.fp8_block_size:
            d["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                            weight_block_size=[self.fp8_block_size, self.fp8_block_size])
            if self.scale_fmt:
                d["quantization_config"]["scale_fmt"] = self.scale_fmt
        if glm:
            rp = dict(rope_type=(self.rope_scaling or {}).get("type", "default"), rope_theta=self.rope_theta,
                      **{k: v for k, v in (self.rope_scaling or {}).items() if k != "type"})
            d.update(model_type="glm_moe_dsa", architectures=["GlmMoeDsaForCausalLM"], rope_parameters=rp,
                     indexer_types=list(types or ["full"] * self.num_hidden_layers))
            d.pop("rope_scaling")
        if beta:
            rp = dict(rope_type=(self.rope_scaling or {}).get("type", "default"), rope_theta=self.rope_theta,
                      **{k: v for k, v in (self.rope_scaling or {}).items() if k != "type"})
            rp.update(llama_4_scaling_beta=beta, original_max_position_embeddings=blen)
            d.update(model_type="mistral4", architectures=["Mistral4ForCausalLM"], rope_parameters=rp,
                     rope_interleave=True)
            d.pop("rope_scaling")
        return d


# model_type values from_hf reads; all are this architecture (docs/checkpoints.md, docs/family.md).
# sarvam_mla: transformers builds it as DeepseekV3ForCausalLM (its config subclasses V3's); mistral4:
# V3 plus query scaling (attn_scale_beta), a softmax router without bias (group_top2 with groups); glm4_moe_lite
# (GLM-4.7-Flash): V3's MLA and router with the dense/MoE schedule as mlp_layer_types
# glm_moe_dsa (GLM-5): V3.2's DSA with an interleaved-RoPE indexer and shared-selection layers
MODEL_TYPES = ("deepseek_v3", "deepseek_v32", "kimi_k2", "deepseek_v2", "sarvam_mla", "mistral4", "glm4_moe_lite",
               "glm_moe_dsa")


def glm_indexer_types(d: dict) -> list:
    """GLM-5's per-layer indexer modes from a config.json: ``indexer_types``, else the pattern
    string ``index_topk_pattern`` ("F"/"S" per layer), else the schedule of ``index_topk_freq``
    and ``index_skip_topk_offset`` (GlmMoeDsaConfig.__post_init__'s rule: layer i is full when
    max(i - offset + 1, 0) is a multiple of freq; defaults 1 and 2, every layer full)."""
    if d.get("indexer_types") is not None:
        return list(d["indexer_types"])
    n = d.get("num_hidden_layers", 78)
    pattern = d.get("index_topk_pattern")
    if pattern is not None:
        bad = [c for c in pattern if isinstance(pattern, str) and c not in "FS"]
        if bad:
            raise ConfigError(f"index_topk_pattern: letters must be 'F' (full) or 'S' (shared), got {bad[:3]}")
        return [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
    freq = max(d.get("index_topk_freq", 1), 1)
    offset = d.get("index_skip_topk_offset", 2)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]


class UnsupportedModelType(ConfigError):
    """A model type of the MLA / DeepSeekMoE family that the lab does not run; the message says why."""


# model types of the family (MLA or DeepSeekMoE in transformers 5.24) that the lab refuses, and why
# (docs/family.md is generated from this by tests/test_family_table.py). deepseek_v4 is not here:
# it has its own engine (dsv3lab/family.py sends it there).
UNSUPPORTED_MODEL_TYPES = {
    "axk1": "A.X K1: V3's block plus an RMSNorm on every MoE layer's output (post_mlp_layernorm); "
            "not in the engine",
    "axk2": "A.X K2: V3.2-style DSA with a fused query/gate projection (gated attention output) and "
            "gated RMSNorm; not in the engine",
    "bailing_hybrid": "Ling hybrid: MLA layers interleaved with gated delta-rule linear-attention layers; "
                      "linear attention is not in the engine",
    "deepseek_v41": "DeepSeek-V4.1: Engram n-gram tables, compressors shared across layers and two-level "
                    "top-k are not implemented (and not in transformers 5.24)",
    "dots3_note_text": "dots3: DSA with GLM-DSA's indexer (interleaved RoPE) in its own attention block; "
                       "not in the engine",
    "glm5_next_text": "GLM-5-Next: GLM-MoE-DSA attention with linear-attention layers and mHC "
                      "hyper-connections; not in the engine",
    "hy_v4": "Hunyuan V4: DSA attention inside mHC hyper-connections; not in the engine",
    "hy_v4_vl_text": "Hunyuan V4 (text of the VL model): DSA attention inside mHC hyper-connections; not in the engine",
    "kimi_linear": "Kimi Linear: KDA linear-attention layers (gated delta rule) beside NoPE MLA layers; "
                   "linear attention is not in the engine",
    "longcat_flash": "LongCat-Flash: zero-computation experts and two attentions per block (shortcut-"
                     "connected MoE); not in the engine",
    "minicpm3": "MiniCPM3: MLA attention with a dense Llama MLP (no MoE) and scaled embeddings; not "
                "the V3 block",
    "mistral_large4_text": "Mistral Large 4: GLM-5's DSA without a q low rank (indexer queries from a LayerNorm of "
                           "the hidden state), learned per-head log-position query scaling, NoPE layers, layers "
                           "reusing an earlier layer's latent KV (kv_source_layers), a learned RoPE frequency scale "
                           "and final logit softcapping; not in the engine",
    "youtu": "Youtu-LLM: MLA attention with a dense MLP (no MoE); not the V3 block",
}


def refusal(d: dict) -> Optional[str]:
    """Why the lab refuses a config.json of the family, or None (not of the family, or supported).
    Listed types have their reason; the rest of the family is recognised by its fields: a wrapper
    around a text model, or DeepSeekMoE-style routing (n_routed_experts) without MLA (no kv_lora_rank)."""
    mt = d.get("model_type")
    if mt in MODEL_TYPES or mt == "deepseek_v4":
        return None
    if mt in UNSUPPORTED_MODEL_TYPES:
        return UNSUPPORTED_MODEL_TYPES[mt]
    tc = d.get("text_config")
    if isinstance(tc, dict) and ("kv_lora_rank" in tc or "n_routed_experts" in tc):
        return (f"a multimodal wrapper (text model {tc.get('model_type')!r} under language_model / "
                "text_config); only text checkpoints of the family load")
    if "n_routed_experts" in d and "kv_lora_rank" not in d:
        return "DeepSeekMoE-style routing (n_routed_experts) without MLA (no kv_lora_rank): not the V3 architecture"
    return None


def _official(name, **kw) -> ModelConfig:
    return ModelConfig(name=name, **kw)


def _yarn(mscale: float) -> dict:
    return dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                beta_slow=1.0, mscale=mscale, mscale_all_dim=mscale)


PRESETS: dict[str, ModelConfig] = {
    "v3-671b": _official("v3-671b"),
    "v2-236b": _official(
        "v2-236b", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=60, first_k_dense_replace=1,
        num_attention_heads=128, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
        n_group=8, topk_group=3, scoring_func="softmax", topk_method="group_limited_greedy",
        routed_scaling_factor=16.0, norm_topk_prob=False, q_lora_rank=1536, rope_scaling=_yarn(1.0),
        num_nextn_predict_layers=0, fp8_block_size=None, eos_token_id=100001, bos_token_id=100000),
    "v2-lite-16b": _official(
        "v2-lite-16b", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
        num_attention_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        n_group=1, topk_group=1, scoring_func="softmax", topk_method="greedy",
        routed_scaling_factor=1.0, norm_topk_prob=False, q_lora_rank=0, rope_scaling=_yarn(0.707),
        num_nextn_predict_layers=0, fp8_block_size=None, eos_token_id=100001, bos_token_id=100000),
    # --- the rest of the family (docs/checkpoints.md, family table) -----------------------------
    # V3.1 / V3.1-Terminus: V3's architecture; the FP8 scales are powers of two (ue8m0).
    "v3.1-671b": _official("v3.1-671b", scale_fmt="ue8m0"),
    # V3.2(-Exp): V3.1 plus DeepSeek Sparse Attention, a lightning indexer in every layer with 64
    # heads of 128 dims choosing 2048 keys per query (official inference/config_671B_v3.2.json and
    # transformers' DeepseekV32Config defaults agree on these).
    "v3.2-671b": _official("v3.2-671b", scale_fmt="ue8m0", index_n_heads=64, index_head_dim=128,
                           index_topk=2048, max_position_embeddings=163840),
    "kimi-k2": _official(
        # Kimi K2 (moonshotai; config.json model_type "kimi_k2", architectures
        # DeepseekV3ForCausalLM): V3's MLA and widths with 384 routed experts in ONE group, 64 heads,
        # one dense layer, no MTP layer shipped, block-FP8 weights. Sources agree on the values set
        # here. Disputed or single-source, so set to the K2-Instruct config.json as we read it:
        # max_position_embeddings 131072 (later K2 releases: 262144), YaRN factor 32 with
        # beta_fast = beta_slow = 1, bos/eos 163584/163585, rms_norm_eps 1e-6 (one source: 1e-5).
        "kimi-k2", vocab_size=163840, num_attention_heads=64, first_k_dense_replace=1,
        n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1,
        routed_scaling_factor=2.827, rope_theta=50000.0, max_position_embeddings=131072,
        rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=4096,
                          beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        num_nextn_predict_layers=0, bos_token_id=163584, eos_token_id=163585),
    "moonlight-16b": _official(
        # Moonlight-16B-A3B (moonshotai; model_type deepseek_v3): 27 layers of width 2048, one
        # dense, 64 routed experts of width 1408 + 2 shared, top-6 in one group, sigmoid gate with
        # bias, NO q low rank (a full q_proj), vocabulary 163840, bf16 weights. Agreed by the
        # sources. Single-source values, set to the published config.json as we read it:
        # intermediate_size 11264, 16 heads, max_position_embeddings 8192 with plain RoPE at
        # rope_theta 50000, routed_scaling_factor 2.446, rms_norm_eps 1e-5, bos/eos 163584/163585.
        "moonlight-16b", vocab_size=163840, hidden_size=2048, intermediate_size=11264,
        moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
        num_attention_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        n_group=1, topk_group=1, routed_scaling_factor=2.446, q_lora_rank=0,
        max_position_embeddings=8192, rope_theta=50000.0, rope_scaling=None, rms_norm_eps=1e-5,
        num_nextn_predict_layers=0, fp8_block_size=None, bos_token_id=163584, eos_token_id=163585),
    # Small lab presets: every V3 feature (sigmoid gate + bias, group-limited top-2-sum routing,
    # q and kv low rank, dense first layers, shared experts, MTP, YaRN) at toy width.
    "tiny": _official(
        "tiny", vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=2048,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=256,
                          beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        num_nextn_predict_layers=1, fp8_block_size=None, initializer_range=0.02),
    "lab": _official(
        "lab", vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=64,
        num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=8, n_routed_experts=32,
        n_shared_experts=1, num_experts_per_tok=4, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=8192,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=1024,
                          beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        num_nextn_predict_layers=1, fp8_block_size=None, initializer_range=0.02),
    # Benchmark size: real MLA head dims and latent width, few layers, so CPU timings reflect
    # the per-layer cost of the released model's attention shapes.
    "bench": _official(
        "bench", vocab_size=8192, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=16, n_routed_experts=32,
        n_shared_experts=1, num_experts_per_tok=4, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, q_lora_rank=384, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=16384,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=4096,
                          beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        num_nextn_predict_layers=1, fp8_block_size=None, initializer_range=0.02),
}


# =============================================================================================
# DeepSeek-V4: compressed attention, mHC, hash-routed MoE (docs/v4.md)
# =============================================================================================

V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
V4_MLP_LAYER_TYPES = ("hash_moe", "moe")
_RATIO_TO_LAYER_TYPE = {0: "sliding_attention", 1: "sliding_attention", 4: "compressed_sparse_attention",
                        128: "heavily_compressed_attention"}


@dataclass(frozen=True)
class V4Config:
    """Every DeepSeek-V4 hyper-parameter, named as transformers' ``DeepseekV4Config`` names it
    (the official ``inference/model.py`` name in brackets). Defaults are V4-Flash's."""
    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 129280
    hidden_size: int = 4096             # [dim]
    moe_intermediate_size: int = 2048   # [moe_inter_dim] one routed expert; the shared one too
    num_hidden_layers: int = 43         # [n_layers]
    num_attention_heads: int = 64       # [n_heads] query heads; ONE shared key/value head
    head_dim: int = 512                 # [head_dim] width of the shared KV entry and of each head
    qk_rope_head_dim: int = 64          # [rope_head_dim] the LAST dims of a head get RoPE
    q_lora_rank: int = 1024             # [q_lora_rank]
    o_groups: int = 8                   # [o_groups] heads split in groups for the output projection
    o_lora_rank: int = 1024             # [o_lora_rank] each group's projected width
    # --- attention per layer -----------------------------------------------------------------
    sliding_window: int = 128           # [window_size] keys every query sees: itself and W-1 before
    layer_types: tuple = ()             # per layer, one of V4_LAYER_TYPES ([compress_ratios] 0/4/128)
    csa_rate: int = 4                   # m: tokens per compressed entry in CSA layers
    hca_rate: int = 128                 # m': tokens per compressed entry in HCA layers
    index_n_heads: int = 64             # CSA's lightning indexer over compressed entries
    index_head_dim: int = 128
    index_topk: int = 512               # compressed entries each query keeps in a CSA layer
    rope_theta: float = 10000.0         # sliding-only layers: plain RoPE
    compress_rope_theta: float = 160000.0   # CSA/HCA layers and their compressors: this base + YaRN
    rope_scaling: Optional[dict] = field(default_factory=lambda: dict(
        type="yarn", factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0, beta_slow=1.0))
    max_position_embeddings: int = 1048576
    # --- mHC ---------------------------------------------------------------------------------
    hc_mult: int = 4                    # [hc_mult] residual streams
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # --- MoE (every layer) -------------------------------------------------------------------
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    scoring_func: str = "sqrtsoftplus"  # [score_func] sqrtsoftplus | sigmoid | softmax
    routed_scaling_factor: float = 1.5
    mlp_layer_types: tuple = ()         # per layer "hash_moe" (tid2eid table) or "moe" ([n_hash_layers])
    swiglu_limit: float = 10.0          # gate <= limit, |up| <= limit before SiLU(gate) * up
    # --- misc --------------------------------------------------------------------------------
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1   # [n_mtp_layers] MTP blocks after the last layer (transformers: none)
    mtp_layer_types: tuple = ()         # their attention ([compress_ratios] past n_layers); default sliding
    bos_token_id: int = 0
    eos_token_id: int = 1
    initializer_range: float = 0.02
    fp8_block_size: Optional[int] = 128
    scale_fmt: Optional[str] = "ue8m0"
    expert_dtype: Optional[str] = None  # "fp4": routed experts MXFP4 (e2m1 + ue8m0 per 32)
    name: str = "v4-flash"

    model_type = "deepseek_v4"

    def __post_init__(self):
        n = self.num_hidden_layers
        if not self.layer_types:
            # transformers' default: two HCA layers, then CSA/HCA alternating
            object.__setattr__(self, "layer_types", tuple(
                ["heavily_compressed_attention"] * min(n, 2)
                + ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
                   for i in range(max(n - 2, 0))]))
        if not self.mlp_layer_types:
            object.__setattr__(self, "mlp_layer_types", tuple(["hash_moe"] * min(n, 3) + ["moe"] * max(0, n - 3)))
        if not self.mtp_layer_types:
            # the release's config lists one compress ratio per layer AND per MTP block; one that
            # stops at the main layers (transformers truncates its list) leaves the MTP block
            # sliding-only (ratio 0), as ports of the release's code read a missing entry (docs/v4.md#mtp)
            object.__setattr__(self, "mtp_layer_types", ("sliding_attention",) * self.num_nextn_predict_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_layer_types", tuple(self.mlp_layer_types))
        object.__setattr__(self, "mtp_layer_types", tuple(self.mtp_layer_types))
        self.validate()

    def validate(self) -> None:
        def need(cond, fld, msg):
            if not cond:
                raise ConfigError(f"V4Config.{fld}: {msg}")
        n = self.num_hidden_layers
        need(len(self.layer_types) == n, "layer_types", f"needs {n} entries, got {len(self.layer_types)}")
        bad = [t for t in self.layer_types if t not in V4_LAYER_TYPES]
        need(not bad, "layer_types", f"entries must be in {V4_LAYER_TYPES}, got {bad[:3]}")
        k = self.num_nextn_predict_layers
        need(k >= 0 and len(self.mtp_layer_types) == k, "mtp_layer_types",
             f"needs num_nextn_predict_layers={k} entries, got {len(self.mtp_layer_types)}")
        bad = [t for t in self.mtp_layer_types if t not in V4_LAYER_TYPES]
        need(not bad, "mtp_layer_types", f"entries must be in {V4_LAYER_TYPES}, got {bad[:3]}")
        need(len(self.mlp_layer_types) == n, "mlp_layer_types", f"needs {n} entries, got {len(self.mlp_layer_types)}")
        bad = [t for t in self.mlp_layer_types if t not in V4_MLP_LAYER_TYPES]
        need(not bad, "mlp_layer_types", f"entries must be in {V4_MLP_LAYER_TYPES}, got {bad[:3]}")
        need(self.scoring_func in ("sqrtsoftplus", "sigmoid", "softmax"), "scoring_func",
             f"must be sqrtsoftplus, sigmoid or softmax, got {self.scoring_func!r}")
        need(self.qk_rope_head_dim % 2 == 0 and 0 < self.qk_rope_head_dim <= self.head_dim, "qk_rope_head_dim",
             f"must be even and in (0, head_dim={self.head_dim}], got {self.qk_rope_head_dim}")
        need(self.qk_rope_head_dim <= self.index_head_dim, "index_head_dim",
             f"must hold the {self.qk_rope_head_dim} rotated dims, got {self.index_head_dim}")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"must divide num_attention_heads={self.num_attention_heads}, got {self.o_groups}")
        need(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"must be in [1, n_routed_experts={self.n_routed_experts}]")
        need(self.sliding_window >= 1, "sliding_window", "must be >= 1")
        need(self.csa_rate >= 1 and self.hca_rate >= 1, "csa_rate", "compression rates must be >= 1")
        need(self.hc_mult >= 1 and self.hc_sinkhorn_iters >= 1, "hc_mult", "hc_mult and hc_sinkhorn_iters must be >= 1")
        need(self.expert_dtype in (None, "fp4", "fp8", "bf16"), "expert_dtype",
             f"must be None, 'fp4', 'fp8' or 'bf16', got {self.expert_dtype!r}")
        need(self.n_shared_experts in (0, 1), "n_shared_experts",
             f"V4 has one shared expert of moe_intermediate_size (or none), got {self.n_shared_experts}")

    # --- derived -----------------------------------------------------------------------------
    @property
    def yarn(self) -> Optional[dict]:
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type")) != "yarn":
            return None
        return dict(factor=float(rs.get("factor", 1.0)),
                    original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 4096)),
                    beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1))

    def compress_rate(self, layer: int) -> int:
        """Tokens per compressed entry of a layer; 0 for a sliding-only layer."""
        t = self.layer_types[layer]
        return self.csa_rate if t == "compressed_sparse_attention" else \
            self.hca_rate if t == "heavily_compressed_attention" else 0

    @property
    def has_moe(self) -> bool:
        return True

    # what V3's instruments (traces, replay, ablation) ask of a config: V4 routes without expert
    # groups, every layer is MoE, the chosen weights are renormalised, learned layers have a bias
    n_group = 1
    topk_group = 1
    first_k_dense_replace = 0
    norm_topk_prob = True
    topk_method = "noaux_tc"

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers

    def is_moe_layer(self, layer: int) -> bool:
        return True

    def replace(self, **kw) -> "V4Config":
        return dataclasses.replace(self, **kw)

    def __hash__(self) -> int:
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @staticmethod
    def preset(name: str) -> "V4Config":
        if name not in V4_PRESETS:
            raise ConfigError(f"unknown V4 preset {name!r}; known: {', '.join(sorted(V4_PRESETS))}")
        return V4_PRESETS[name]

    # --- HF config.json ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: Any) -> "V4Config":
        """A ``deepseek_v4`` config.json: transformers' form (``layer_types``, ``compress_rates``,
        nested ``rope_parameters``) or the release's (``compress_ratios``, ``num_hash_layers``,
        ``rope_scaling``)."""
        d, src = _read_json(path_or_dict)
        if d.get("model_type") != "deepseek_v4":
            raise ConfigError(f"{src}: model_type must be 'deepseek_v4', got {d.get('model_type')!r}")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k not in (
            "name", "layer_types", "mlp_layer_types", "mtp_layer_types", "rope_scaling", "fp8_block_size", "scale_fmt", "expert_dtype")}
        n = int(d.get("num_hidden_layers", 43))
        rates = d.get("compress_rates") or {}
        kw["csa_rate"] = int(rates.get("compressed_sparse_attention", d.get("compress_rate_csa", 4)))
        kw["hca_rate"] = int(rates.get("heavily_compressed_attention", d.get("compress_rate_hca", 128)))
        k = int(d.get("num_nextn_predict_layers", 1))
        ratio_types = None
        if d.get("compress_ratios"):
            try:
                ratio_types = tuple(_RATIO_TO_LAYER_TYPE[int(r)] for r in d["compress_ratios"])
            except KeyError as e:
                raise ConfigError(f"{src}: compress_ratios holds {e.args[0]}; known: 0, 4, 128") from None
        if d.get("layer_types"):
            kw["layer_types"] = tuple(d["layer_types"][:n])
        elif ratio_types:
            kw["layer_types"] = ratio_types[:n]
        # the MTP blocks' attention: entries past the main layers (the release lists n + k ratios)
        mtp = d.get("mtp_layer_types") or (d.get("layer_types") or ratio_types or ())[n:n + k]
        if len(mtp) == k:
            kw["mtp_layer_types"] = tuple(mtp)
        if d.get("mlp_layer_types"):
            kw["mlp_layer_types"] = tuple(d["mlp_layer_types"][:n])
        elif d.get("num_hash_layers") is not None:
            h = int(d["num_hash_layers"])
            kw["mlp_layer_types"] = tuple(["hash_moe"] * min(n, h) + ["moe"] * max(0, n - h))
        if d.get("qk_rope_head_dim") is None and d.get("partial_rotary_factor"):
            kw["qk_rope_head_dim"] = int(d.get("head_dim", 512) * d["partial_rotary_factor"])
        rp = d.get("rope_parameters") or {}
        rs = rp.get("compress") if isinstance(rp.get("compress"), dict) else (d.get("rope_scaling") or rp)
        if isinstance(rp.get("main"), dict) and "rope_theta" in rp["main"]:
            kw["rope_theta"] = rp["main"]["rope_theta"]
        if isinstance(rp.get("compress"), dict) and "rope_theta" in rp["compress"]:
            kw["compress_rope_theta"] = rp["compress"]["rope_theta"]
        rtype = (rs or {}).get("rope_type", (rs or {}).get("type"))
        kw["rope_scaling"] = None if rtype in (None, "default") else dict(
            type=rtype, **{k: v for k, v in rs.items() if k in (
                "factor", "original_max_position_embeddings", "beta_fast", "beta_slow")})
        qc = d.get("quantization_config")
        kw["fp8_block_size"] = kw["scale_fmt"] = None
        if qc:
            if qc.get("quant_method") != "fp8":
                raise ConfigError(f"{src}: quantization_config.quant_method {qc.get('quant_method')!r} "
                                  "is not supported (only 'fp8')")
            kw["fp8_block_size"] = int(qc.get("weight_block_size", [128, 128])[0])
            kw["scale_fmt"] = qc.get("scale_fmt")
            kw["expert_dtype"] = qc.get("expert_dtype", d.get("expert_dtype"))
        for k in ("eos_token_id", "bos_token_id"):
            if isinstance(kw.get(k), list):
                kw[k] = kw[k][0]
            if kw.get(k) is None:
                kw.pop(k, None)
        for k in ("rope_theta", "compress_rope_theta", "hc_eps", "routed_scaling_factor", "swiglu_limit",
                  "rms_norm_eps", "initializer_range"):
            if k in kw:
                kw[k] = float(kw[k])
        kw["name"] = os.path.basename(os.path.dirname(src)) if src != "dict" else "hf"
        try:
            return cls(**kw)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{src}: {e}") from None

    def to_hf(self) -> dict:
        """transformers' ``DeepseekV4Config`` dict (what ``DeepseekV4ForCausalLM`` reads)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("name", "fp8_block_size", "scale_fmt", "expert_dtype", "csa_rate", "hca_rate",
                  "rope_scaling", "qk_rope_head_dim"):
            d.pop(k)
        d["layer_types"], d["mlp_layer_types"] = list(self.layer_types), list(self.mlp_layer_types)
        d["mtp_layer_types"] = list(self.mtp_layer_types)
        d["compress_rates"] = {"compressed_sparse_attention": self.csa_rate,
                               "heavily_compressed_attention": self.hca_rate}
        d["partial_rotary_factor"] = self.qk_rope_head_dim / self.head_dim
        compress = dict(rope_type="default")
        if self.rope_scaling:
            compress = {k: v for k, v in self.rope_scaling.items() if k != "type"}
            compress.update(rope_type=self.rope_scaling.get("type", "yarn"), attention_factor=1.0)
        compress.update(rope_theta=self.compress_rope_theta, partial_rotary_factor=d["partial_rotary_factor"])
        d["rope_parameters"] = {"main": dict(rope_type="default", rope_theta=self.rope_theta,
                                             partial_rotary_factor=d["partial_rotary_factor"]),
                                "compress": compress}
        d.update(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], num_key_value_heads=1,
                 hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16")
        if self.fp8_block_size:
            d["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                            weight_block_size=[self.fp8_block_size] * 2)
            if self.scale_fmt:
                d["quantization_config"]["scale_fmt"] = self.scale_fmt
            if self.expert_dtype:
                d["quantization_config"]["expert_dtype"] = self.expert_dtype
        return d


def _read_json(path_or_dict: Any) -> tuple[dict, str]:
    if isinstance(path_or_dict, (str, os.PathLike)):
        p = os.fspath(path_or_dict)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        if not os.path.exists(p):
            raise ConfigError(f"{p}: no config.json")
        try:
            with open(p) as f:
                return json.load(f), p
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
    return dict(path_or_dict), "dict"


def hf_model_type(path_or_dict: Any) -> Optional[str]:
    """The ``model_type`` of a checkpoint directory / config.json / dict (None when absent)."""
    try:
        return _read_json(path_or_dict)[0].get("model_type")
    except ConfigError:
        return None


_FLASH_LAYERS = tuple(["sliding_attention"] * 2 + ["compressed_sparse_attention" if i % 2 == 0
                                                   else "heavily_compressed_attention" for i in range(41)])
_PRO_LAYERS = tuple(["heavily_compressed_attention"] * 2 + ["compressed_sparse_attention" if i % 2
                                                            else "heavily_compressed_attention" for i in range(59)])

V4_PRESETS: dict[str, V4Config] = {
    # V4-Flash (284B total, 13B activated, model card): the published Flash(-Base) config.json as
    # echoed by serving engines: 43 layers of width 4096, 64 heads of 512, q rank 1024, 8 output
    # groups of 1024, compress_ratios [0, 0, 4, 128, 4, ...] (two sliding-only layers, then CSA and
    # HCA alternating), 256 experts of 2048 + 1 shared, top-6, 3 hash layers, YaRN 16 over 65536.
    "v4-flash": V4Config(name="v4-flash", layer_types=_FLASH_LAYERS),
    # V4-Pro (1.6T total, 49B activated): 61 layers of width 7168, 128 heads, q rank 1536, 16
    # output groups, 384 experts of 3072 + 1 shared, top-6 (third-party copies of config.json:
    # unverified). The layer schedule is transformers' default, described as V4-Pro's: two HCA
    # layers, then HCA/CSA alternating (unverified); index_topk 1024 (unverified).
    "v4-pro": V4Config(name="v4-pro", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                       q_lora_rank=1536, o_groups=16, n_routed_experts=384, moe_intermediate_size=3072,
                       index_topk=1024, layer_types=_PRO_LAYERS),
    # the lab's V4: every layer type, both routers, mHC with 2 streams, at toy width
    "v4-tiny": V4Config(
        name="v4-tiny", vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=16,
        sliding_window=8, csa_rate=4, hca_rate=8, index_n_heads=8, index_head_dim=16, index_topk=3,
        layer_types=("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"),
        mlp_layer_types=("hash_moe", "moe", "moe", "moe"), hc_mult=2, n_routed_experts=8,
        num_experts_per_tok=2, max_position_embeddings=2048,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=32.0,
                          beta_slow=1.0),
        fp8_block_size=None, scale_fmt=None, num_nextn_predict_layers=0),
}
