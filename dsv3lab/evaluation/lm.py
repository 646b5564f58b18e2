"""The ``dsv3lab`` model for lm-eval: a checkpoint directory answered by the engine.

lm-eval turns every task into three kinds of request; this class answers each on the engine:

  loglikelihood(context, continuation)  sum of log p(continuation tokens | context), and whether
        every continuation token was the argmax. lm-eval's ``TemplateLM`` does the tokenisation
        (context's trailing spaces moved onto the continuation; the pair encoded whole and split
        at the context's length), this file scores the token lists: requests sorted longest
        first, right-padded into batches, one forward each (the head applied only at the scored
        positions), log-softmax in fp32. Right padding is
        exact for a causal model: a position never sees the pads after it, and routing is per
        token (no capacity, no drops at inference).
  loglikelihood_rolling(text)  the whole text's log-likelihood in disjoint windows of
        ``max_length`` tokens (lm-eval's own window rule), each scored as above; the first window
        is conditioned on ``prefix_token_id`` (BOS, or EOS when the model has no BOS habit).
  generate_until(context, gen_kwargs)  ``model.generate`` on batches of prompts with the same
        generation settings (greedy unless ``do_sample``), stopped early once every sequence has
        produced EOS or one of the ``until`` strings, and the text cut before the first of them.

Contexts longer than ``max_length`` (default: the config's ``max_position_embeddings``) keep
their last tokens, as lm-eval's HF model does. Model arguments (``--model_args k=v,...``):
``pretrained`` (checkpoint directory, or an already loaded model when called from Python),
``dtype``, ``device``, ``batch_size`` (an int, or ``auto`` for batches of up to
``max_batch_tokens`` tokens), ``max_length``, ``max_gen_toks``, ``add_bos_token`` (default: the
checkpoint's tokenizer_config.json, else True as DeepSeek-V3's tokenizer does), ``attn_mode``,
``fp8`` (``dequant`` or ``keep``), ``seed`` (for sampled generation).

``--apply_chat_template`` renders the checkpoint's ``tokenizer_config.json`` chat template (the
released chat models ship one); lm-eval then tokenizes the rendered text as above (a leading
BOS in it is kept, not doubled).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

eval_logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _as_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes"):
        return True
    if s in ("0", "false", "no"):
        return False
    raise ValueError(f"dsv3lab lm-eval model: expected a boolean, got {v!r}")


def _tokenizer_config(path: str) -> dict:
    f = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(f):
        return {}
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


class _AllStopped(Exception):
    """Raised from generate's per-step callback once every sequence has met a stop string."""


@register_model("dsv3lab")
class DSV3LabLM(TemplateLM):
    def __init__(self, pretrained=None, tokenizer=None, dtype: Optional[str] = None,
                 device: Optional[str] = None, batch_size=1, max_batch_size=None,
                 max_batch_tokens: int = 16384, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, add_bos_token=None, attn_mode: str = "absorbed",
                 fp8: str = "dequant", seed: int = 0, **unknown):
        super().__init__()
        if unknown:
            raise TypeError(f"dsv3lab lm-eval model: unknown model_args {sorted(unknown)}; known: pretrained, "
                            "tokenizer, dtype, device, batch_size, max_batch_size, max_batch_tokens, "
                            "max_length, max_gen_toks, add_bos_token, attn_mode, fp8, seed")
        if pretrained is None:
            raise ValueError("dsv3lab lm-eval model: give pretrained=DIR (a checkpoint directory)")
        if dtype is not None and dtype not in _DTYPES and dtype != "auto":
            raise ValueError(f"dsv3lab lm-eval model: unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
        torch_dtype = None if dtype in (None, "auto") else _DTYPES[dtype]
        bs = str(batch_size).strip().lower()
        if bs.startswith("auto"):
            self.batch_size, self.max_batch_tokens = None, int(max_batch_tokens)
        else:
            try:
                self.batch_size = int(bs)
            except ValueError:
                raise ValueError(f"dsv3lab lm-eval model: batch_size must be an integer or 'auto', "
                                 f"got {batch_size!r}") from None
            if self.batch_size < 1:
                raise ValueError(f"dsv3lab lm-eval model: batch_size must be >= 1, got {self.batch_size}")
            self.max_batch_tokens = None
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI fills in cuda:0 when --device is not given; its HF model falls back too
            eval_logger.warning("dsv3lab lm-eval model: %s asked for but CUDA is not available; using the CPU",
                                device)
            device = "cpu"
        tok_config: dict = {}
        if isinstance(pretrained, (str, os.PathLike)):
            import dsv3lab
            from dsv3lab.tokenizer import load_tokenizer
            path = os.fspath(pretrained)
            if not os.path.exists(os.path.join(path, "config.json")):
                raise ValueError(f"dsv3lab lm-eval model: {path} is not a checkpoint directory (no config.json)")
            self.model = dsv3lab.load(path, dtype=torch_dtype, device=device, fp8=fp8, attn_mode=attn_mode,
                                      progress=True)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
            if tokenizer is None:
                raise ValueError(f"dsv3lab lm-eval model: {path} has no tokenizer.json; lm-eval works on text")
            tok_config = _tokenizer_config(path)
            self._name = path
        else:
            self.model = pretrained
            if tokenizer is None:
                raise ValueError("dsv3lab lm-eval model: a loaded model needs tokenizer= (a tokenizers.Tokenizer)")
            self._name = getattr(self.model.cfg, "name", "dsv3lab")
        self.model.eval()
        self.tokenizer = tokenizer
        self.cfg = self.model.cfg
        self._max_length = int(max_length or self.cfg.max_position_embeddings)
        if self._max_length > self.cfg.max_position_embeddings:
            raise ValueError(f"dsv3lab lm-eval model: max_length {self._max_length} exceeds the model's "
                             f"max_position_embeddings {self.cfg.max_position_embeddings}")
        self.max_gen_toks = int(max_gen_toks)
        if add_bos_token is None:
            add_bos_token = tok_config.get("add_bos_token", True)
        self.add_bos_token = _as_bool(add_bos_token) and self.cfg.bos_token_id is not None
        self.max_batch_size = int(max_batch_size) if max_batch_size else 64
        self.seed = int(seed)
        self.tok_config = tok_config

    # -- chat template (--apply_chat_template): the checkpoint's tokenizer_config.json ------
    def chat_template(self, chat_template=False) -> Optional[str]:
        if chat_template is False or chat_template is None:
            return None
        tpl = self.tok_config.get("chat_template")
        if isinstance(tpl, list):            # named templates: [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in tpl}
            tpl = named.get(chat_template if isinstance(chat_template, str) else "default")
        if not tpl:
            raise ValueError(f"dsv3lab lm-eval model: {self._name} has no chat_template in tokenizer_config.json; "
                             "evaluate without --apply_chat_template")
        return tpl

    def _special(self, key: str) -> str:
        v = self.tok_config.get(key) or ""
        return v.get("content", "") if isinstance(v, dict) else str(v)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the checkpoint's Jinja chat template (sandboxed), with
        the names transformers gives it: messages, add_generation_prompt, bos_token, eos_token."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise ValueError(f"chat template: {msg}")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template(True)).render(
            messages=chat_history, add_generation_prompt=add_generation_prompt,
            bos_token=self._special("bos_token"), eos_token=self._special("eos_token"))

    # -- what TemplateLM asks for -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.cfg.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.cfg.bos_token_id) if self.add_bos_token else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self._name

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        ids = list(self.tokenizer.encode(string, add_special_tokens=False).ids)
        bos = self.cfg.bos_token_id
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add and bos is not None and (not ids or ids[0] != bos):
            ids = [int(bos)] + ids
        return ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- batching ---------------------------------------------------------------------------
    def _batches(self, order: list[int], lengths: list[int]):
        """Consecutive batches of ``order`` (sorted longest first): a fixed count, or ``auto``'s
        token budget (batch rows x longest row <= max_batch_tokens)."""
        i = 0
        while i < len(order):
            if self.batch_size is not None:
                n = self.batch_size
            else:
                n = max(1, min(self.max_batch_size, self.max_batch_tokens // max(1, lengths[order[i]])))
            yield order[i:i + n]
            i += n

    @torch.no_grad()
    def _score(self, inputs: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool]]:
        """One right-padded forward: log p of each row's ``targets`` at its last len(targets)
        input positions, and whether each was the argmax."""
        width = max(map(len, inputs))
        x = torch.zeros((len(inputs), width), dtype=torch.long, device=self.device)
        for r, inp in enumerate(inputs):
            x[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        # the head only where a target is scored: [B,S,V] logits of a 129K vocabulary would be
        # most of the memory of a long batch
        h = self.model.hidden(x)
        out = []
        for r, (inp, tgt) in enumerate(zip(inputs, targets)):
            n, k = len(inp), len(tgt)
            logp = F.log_softmax(self.model.head(h[r, n - k:n]).float(), dim=-1)
            t = torch.tensor(tgt, dtype=torch.long, device=logp.device)
            ll = float(logp.gather(-1, t[:, None]).sum())
            greedy = bool((logp.argmax(-1) == t).all())
            out.append((ll, greedy))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        inputs, targets = [], []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise ValueError("dsv3lab lm-eval model: a loglikelihood request has an empty continuation")
            if len(continuation_enc) > self.max_length:
                raise ValueError(f"dsv3lab lm-eval model: continuation of {len(continuation_enc)} tokens is longer "
                                 f"than max_length {self.max_length}")
            whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            inputs.append(whole[:-1])
            targets.append(list(continuation_enc))
        lengths = [len(i) for i in inputs]
        order = sorted(range(len(inputs)), key=lambda i: -lengths[i])
        results: list = [None] * len(inputs)
        pbar = tqdm(total=len(inputs), desc="dsv3lab loglikelihood", disable=disable_tqdm)
        for batch in self._batches(order, lengths):
            scored = self._score([inputs[i] for i in batch], [targets[i] for i in batch])
            for i, res in zip(batch, scored):
                results[i] = res
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
            pbar.update(len(batch))
        pbar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (text,) in enumerate([req.args for req in requests]):
            ids = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scored = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, scored):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -------------------------------------------------------------------------
    def _settings(self, gen_kwargs: dict) -> tuple[list[str], int, float, float]:
        kw = dict(gen_kwargs)
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eot = self.tok_decode([self.eot_token_id])
        if eot and eot not in until:
            until.append(eot)
        max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
        do_sample = _as_bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0))
        top_p = float(kw.pop("top_p", 1.0))
        if not do_sample:
            temperature, top_p = 0.0, 1.0
        elif temperature <= 0:
            raise ValueError("dsv3lab lm-eval model: do_sample=True needs temperature > 0")
        return until, max_new, temperature, top_p

    def _generate_batch(self, prompts: list[list[int]], until: list[str], max_new: int,
                        temperature: float, top_p: float) -> list[str]:
        """Generate for one batch; stop as soon as every row holds EOS or a stop string."""
        lens = [len(p) for p in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        eos = self.eot_token_id
        stops = [s for s in until if s]

        def on_step(pos, step_tokens):
            for r, t in enumerate(step_tokens.tolist()):
                if done[r] or pos < lens[r]:
                    continue            # finished, or still force-fed its own prompt
                if t == eos:
                    done[r] = True
                    continue
                new[r].append(t)
                if len(new[r]) >= max_new or any(s in self.tok_decode(new[r]) for s in stops):
                    done[r] = True
            if all(done):
                raise _AllStopped

        try:
            self.model.generate(prompts, max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                                stop_tokens=[eos], seed=self.seed, on_step=on_step)
        except _AllStopped:
            pass
        texts = []
        for ids in new:
            text = self.tok_decode(ids[:max_new])
            for s in stops:
                text = text.split(s)[0]
            texts.append(text)
        return texts

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        args = [req.args for req in requests]
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        results: list = [None] * len(requests)
        pbar = tqdm(total=len(requests), desc="dsv3lab generate_until", disable=disable_tqdm)
        for members in groups.values():
            until, max_new, temperature, top_p = self._settings(args[members[0]][1])
            if max_new >= self.max_length:
                raise ValueError(f"dsv3lab lm-eval model: max_gen_toks {max_new} leaves no room for a prompt "
                                 f"within max_length {self.max_length}")
            keep = self.max_length - max_new
            prompts = {}
            for i in members:
                ids = self.tok_encode(args[i][0])[-keep:]
                prompts[i] = ids or [self.prefix_token_id]
            order = sorted(members, key=lambda i: -len(prompts[i]))
            lengths = {i: len(prompts[i]) + max_new for i in members}
            for batch in self._batches(order, lengths):
                texts = self._generate_batch([prompts[i] for i in batch], until, max_new, temperature, top_p)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
                pbar.update(len(batch))
        pbar.close()
        return results
