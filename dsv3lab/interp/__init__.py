"""Interpretability on the engine's hook points: what each layer and each expert contributes, and
what happens when the routing is forced or an expert removed.

  lens.py            logit_lens (+ the MTP module's view, + affine translators), next_token_stats
  replay.py          replay: forwards on recorded routing; perturbed_biases, routing_or_experts
  routing_layouts.py vLLM / SGLang per-token routed experts <-> trace records
  ablate.py          ablate_experts (reroute | zero), expert_importance
  patching.py        activation_patching at any hook point, expert_patching, logit_diff
  attribution.py     direct_logit_attribution down to single routed experts
  specialisation.py  token classes from the text, routing per class, JSD, co-activation
  figures.py         matplotlib figures of all of the above (pure, return a Figure)
  resume.py, windows.py   resume a forward at block L; corpus windows and their loss
"""

from dsv3lab.interp.ablate import ablate_experts, expert_importance
from dsv3lab.interp.attribution import Attribution, direct_logit_attribution
from dsv3lab.interp.lens import fit_affine_lens, lens_kl, logit_lens, next_token_stats
from dsv3lab.interp.patching import PatchResult, activation_patching, expert_patching, logit_diff, patched_run
from dsv3lab.interp.replay import Replay, ReplayError, perturbed_biases, replay, routing_or_experts
from dsv3lab.interp.routing_layouts import (from_per_token, from_sglang_routed, from_vllm, to_sglang_routed,
                                            to_vllm)
from dsv3lab.interp.specialisation import (Specialisation, classify_text, coactivation, expert_specialisation,
                                           routing_by_class, token_classes)
from dsv3lab.interp.windows import corpus_windows, next_token_loss

__all__ = ["ablate_experts", "expert_importance", "Attribution", "direct_logit_attribution", "logit_lens",
           "fit_affine_lens", "lens_kl",
           "next_token_stats", "PatchResult", "activation_patching", "expert_patching", "logit_diff",
           "patched_run", "Replay", "ReplayError", "perturbed_biases", "replay", "routing_or_experts",
           "from_per_token", "from_sglang_routed", "from_vllm", "to_sglang_routed", "to_vllm",
           "Specialisation", "classify_text", "coactivation", "expert_specialisation", "routing_by_class",
           "token_classes", "corpus_windows", "next_token_loss"]
