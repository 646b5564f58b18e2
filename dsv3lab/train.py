"""Small-scale training for DeepSeek-V3-architecture models, and the lab's default model.

What one step does (the V3 recipe at toy scale, in the order the code runs it):

  1. Forward the main model on a window of S tokens and the MTP depths on the same hidden states.
     loss = CE(next token) + (lambda / D) * sum_k CE_k(token i+1+k)        (FACTS A.6, lambda 0.3)
     plus, only when ``aux_alpha > 0``, the sequence-wise balance loss alpha * sum_i f_i P_i
     per MoE layer, averaged over the sequences of the batch (FACTS A.4; off by default, V3 uses
     1e-4, kept here for ablations).
  2. Backward, clip the global grad norm to 1.0, AdamW (0.9, 0.95, weight decay 0.1 on matrices),
     linear warm-up then cosine decay of the learning rate.
  3. Aux-loss-free balancing, outside autograd: every gate counts the experts its top-k chose in
     this step's forward (a hook on ``gate.hook_topk_ids``) and moves its
     ``e_score_correction_bias`` by gamma * sign(mean_load - load_i): an overloaded expert's bias
     goes down, an underloaded one's goes up. That is the paper's uncentred form, dsv3lab's
     default (FACTS D.4); ``bias_centred=True`` subtracts the mean step (torchtitan's form), which
     routes identically because a common shift of all biases changes no top-k. The bias only
     selects experts; the routing weights stay the unbiased sigmoid scores (``moe.Gate``).

MaxVio of a batch is (max_i load_i - mean load) / mean load, averaged over the MoE layers
(FACTS C.7). Everything is seeded: the same ``TrainConfig`` and data give the same losses and
weights, bit for bit, on the same machine and thread count.

``train-lab`` builds the lab's default model: a byte-level BPE tokenizer and the ``lab`` preset
trained on text that ships with Python (the reference manual in ``pydoc_data.topics`` and the
standard library's docstrings), saved as FP8 in the official layout with its tokenizer, training
log, model card and loss curve.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from dsv3lab.atomic import write_bytes_atomic

from dsv3lab.config import ModelConfig

BOS = "<｜begin▁of▁sentence｜>"   # DeepSeek-V3's special-token spellings, ids 0 and 1 here
EOS = "<｜end▁of▁sentence｜>"


# --------------------------------------------------------------------------------------------
# corpus and tokenizer
# --------------------------------------------------------------------------------------------

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
              "__pycache__", "ensurepip", "tkinter", "pydoc_data", "encodings"}


def reflow(text: str) -> str:
    """Join the hard-wrapped lines of prose paragraphs (the manual wraps at ~70 columns, which
    would make "\\n" the commonest token). Paragraphs with an indented line (code, grammar,
    tables) or a heading rule keep their lines."""
    out = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        rule = any(ln and set(ln.strip()) <= set("*=-~^") for ln in lines)
        if len(lines) > 1 and not rule and not any(ln[:1].isspace() for ln in lines):
            para = " ".join(ln.strip() for ln in lines)
        out.append(para)
    return "\n\n".join(out)


def python_docs_corpus(docstrings: bool = True, min_docstring_chars: int = 200) -> list[str]:
    """Documents from Python's own text, in a fixed order: every topic of the reference manual
    (``pydoc_data.topics``), then the module/class/function docstrings of the standard library
    read with ``ast`` (nothing is imported, so no module runs). Short docstrings are dropped: they
    are mostly signatures. Prose paragraphs are unwrapped (``reflow``). The text depends on the Python version (the model card records it)."""
    from pydoc_data.topics import topics
    docs = [reflow(topics[k].strip()) for k in sorted(topics) if topics[k].strip()]
    if not docstrings:
        return docs
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("config-"))
        for fn in sorted(files):
            if not fn.endswith(".py"):
                continue
            try:
                with open(os.path.join(d, fn), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    s = ast.get_docstring(node)
                    if s and len(s) >= min_docstring_chars:
                        docs.append(reflow(s))
    return docs


def split_documents(docs: Sequence[str], val_fraction: float = 0.05, seed: int = 0):
    """(train_docs, val_docs): a seeded shuffle of whole documents, so no text is in both."""
    idx = list(range(len(docs)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(len(docs) * val_fraction)) if len(docs) > 1 else 0
    val = sorted(idx[:n_val])
    train = sorted(idx[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


def train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (BOS, EOS)):
    """A byte-level BPE ``tokenizers.Tokenizer`` (as the released model uses): every byte is a
    base token, so any text encodes and decodes back exactly. The special tokens get ids
    0, 1, ... in order (BOS = 0, EOS = 1, as ``ModelConfig`` expects)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, torch.get_num_threads())))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def encode_documents(tok, docs: Sequence[str], eos_id: int = 1) -> torch.Tensor:
    """One int64 stream: each document's ids followed by EOS."""
    ids: list[int] = []
    for enc in tok.encode_batch(list(docs)):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int64)


def unigram_cross_entropy(train_tokens: torch.Tensor, val_tokens: torch.Tensor, vocab_size: int) -> float:
    """Nats per token of the best context-free model (add-one smoothed train frequencies) on the
    validation stream: the loss a model that learned nothing about context would reach."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val_tokens].mean())


# --------------------------------------------------------------------------------------------
# the training recipe
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3                # peak; cosine decays to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1       # matrices only; norms are not decayed
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3         # loss weight of the MTP depths, (lambda / D) * sum_k CE_k
    bias_gamma: float = 0.001       # aux-loss-free bias step; 0 turns balancing off
    bias_centred: bool = False      # False: the paper's form; True: subtract the mean step
    aux_alpha: float = 0.0          # sequence-wise balance loss weight (V3: 1e-4); 0 = off
    seed: int = 0
    eval_every: int = 50            # steps between validation passes (and at the last step)
    eval_batches: int = 4
    max_seconds: Optional[float] = None   # stop early (schedule unchanged) after this wall time
    threads: int = 2


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    t = min(1.0, (step - tc.warmup_steps) / span)
    lo = tc.lr * tc.min_lr_ratio
    return lo + 0.5 * (tc.lr - lo) * (1 + math.cos(math.pi * t))


def moe_gates(model) -> list:
    """Every routed gate of the model, main blocks then MTP blocks (each has its own bias)."""
    from dsv3lab.model.moe import Gate
    return [m for m in model.modules() if isinstance(m, Gate)]


class RoutingRecorder:
    """Forward hooks on each gate: ``topk_ids[i]`` [T,k] and (if ``scores``) the differentiable
    scores [T,E] of gate i from the latest forward. Use as a ``with`` block."""

    def __init__(self, model, scores: bool = False):
        self.gates = moe_gates(model)
        self.want_scores = scores
        self.topk_ids: list[Optional[torch.Tensor]] = [None] * len(self.gates)
        self.scores: list[Optional[torch.Tensor]] = [None] * len(self.gates)
        self._handles = []

    def __enter__(self):
        for i, g in enumerate(self.gates):
            self._handles.append(g.hook_topk_ids.register_forward_hook(
                lambda mod, inp, out, i=i: self.topk_ids.__setitem__(i, out.detach())))
            if self.want_scores:
                self._handles.append(g.hook_scores.register_forward_hook(
                    lambda mod, inp, out, i=i: self.scores.__setitem__(i, out)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self):
        self.topk_ids = [None] * len(self.gates)
        self.scores = [None] * len(self.gates)

    def counts(self) -> list[torch.Tensor]:
        """Tokens routed to each expert, per gate: [E] int64 (gates that did not run are skipped)."""
        return [torch.bincount(ids.reshape(-1), minlength=g.cfg.n_routed_experts)
                for g, ids in zip(self.gates, self.topk_ids) if ids is not None]


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load for one layer's [E] counts."""
    counts = counts.double()
    mean = counts.mean()
    return float((counts.max() - mean) / mean) if mean > 0 else 0.0


@torch.no_grad()
def bias_update(gate, counts: torch.Tensor, gamma: float, centred: bool = False) -> torch.Tensor:
    """b_i += gamma * sign(mean - load_i) on ``gate.e_score_correction_bias``, in place, outside
    autograd. ``centred`` subtracts the mean step so the biases keep summing to what they did.
    Returns the step taken [E]."""
    bias = gate.e_score_correction_bias
    load = counts.to(torch.float32)
    delta = gamma * torch.sign(load.mean() - load)
    if centred:
        delta = delta - delta.mean()
    bias.add_(delta.to(bias.device, bias.dtype))
    return delta


def sequence_balance_loss(scores: torch.Tensor, topk_ids: torch.Tensor, batch: int, top_k: int) -> torch.Tensor:
    """V3's sequence-wise balance loss sum_i f_i P_i (without alpha), averaged over sequences.
    scores [B*T, E] the gate's sigmoid scores, topk_ids [B*T, k]; T tokens per sequence.
    f_i = E / (k T) * #{t: i in TopK_t}; P_i = mean_t s_{i,t} / sum_j s_{j,t}."""
    E = scores.shape[-1]
    s = scores.reshape(batch, -1, E)
    T = s.shape[1]
    chosen = torch.zeros(batch * T, E, device=scores.device).scatter_(1, topk_ids.reshape(batch * T, -1), 1.0)
    f = chosen.view(batch, T, E).sum(1) * (E / (top_k * T))                   # [B,E], no grad
    P = (s / s.sum(-1, keepdim=True)).mean(1)                                 # [B,E]
    return (f * P).sum(-1).mean()


def lm_losses(model, window: torch.Tensor, mtp_depth: Optional[int] = None):
    """window [B, S+2] token ids -> (next-token CE, [CE of MTP depth k for k = 1..D]).
    The main model reads positions 0..S-1; depth k predicts token i+1+k from position i."""
    S = window.shape[1] - 2
    x, nxt = window[:, :S], window[:, 1:S + 1]
    logits, h = model(x, return_hidden=True)
    main = F.cross_entropy(logits.float().flatten(0, 1), nxt.flatten())
    mtp = []
    if len(model.mtp) and (mtp_depth is None or mtp_depth > 0):
        for k, lg in enumerate(model.mtp_logits(h, nxt, depth=mtp_depth), start=1):
            tgt = window[:, 1 + k:1 + k + lg.shape[1]]
            mtp.append(F.cross_entropy(lg.float().flatten(0, 1), tgt.flatten()))
    return main, mtp


def sample_windows(tokens: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``length`` tokens from a 1-D stream -> [batch, length]."""
    if tokens.numel() <= length:
        raise ValueError(f"the token stream ({tokens.numel()} tokens) is shorter than one window "
                         f"of {length}; use a shorter seq_len or more text")
    starts = torch.randint(0, tokens.numel() - length, (batch,), generator=gen)
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """Up to ``n`` consecutive non-overlapping windows from the start of the stream."""
    n = min(n, tokens.numel() // length)
    if n == 0:
        raise ValueError(f"the validation stream ({tokens.numel()} tokens) is shorter than one window")
    return tokens[:n * length].view(n, length)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Mean next-token CE, MTP CE and MaxVio (mean over MoE layers) over fixed windows [N, S+2]."""
    was_training = model.training
    model.eval()
    losses, mtps, vios = [], [], []
    with RoutingRecorder(model) as rec:
        for i in range(0, windows.shape[0], batch_size):
            rec.reset()
            main, mtp = lm_losses(model, windows[i:i + batch_size])
            losses.append(float(main))
            if mtp:
                mtps.append(float(sum(mtp)) / len(mtp))
            counts = rec.counts()
            if counts:
                vios.append(sum(max_violation(c) for c in counts) / len(counts))
    model.train(was_training)
    out = dict(val_loss=sum(losses) / len(losses))
    if mtps:
        out["val_mtp_loss"] = sum(mtps) / len(mtps)
    if vios:
        out["val_maxvio"] = sum(vios) / len(vios)
    return out


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def _adamw(groups, tc: TrainConfig):
    try:
        return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), fused=True)
    except (RuntimeError, TypeError):  # a torch/device without the fused kernel
        return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), foreach=True)


def train(cfg: ModelConfig | str, train_tokens: torch.Tensor, val_tokens: Optional[torch.Tensor] = None,
          tc: TrainConfig = TrainConfig(), model=None, progress: bool = True,
          log_path: Optional[str] = None):
    """Train ``cfg`` (or continue ``model``) on a 1-D token stream. Returns (model, log): the model
    in eval mode and a list of dicts, one per step (step, loss, mtp_loss, lr, maxvio, grad_norm,
    tokens_per_s, elapsed_s, and val_loss/val_mtp_loss/val_maxvio on evaluation steps).
    ``log_path`` gets the log as JSONL, written atomically when training ends."""
    from dsv3lab.checkpoint import build
    if isinstance(cfg, str):
        cfg = ModelConfig.preset(cfg)
    torch.set_num_threads(tc.threads)
    # Adam's second moments of rarely routed experts underflow into denormals, which are ~100x
    # slower on CPU; flushing them changes nothing measurable and keeps steps uniform.
    flushed = torch.set_flush_denormal(True)
    torch.manual_seed(tc.seed)
    if model is None:
        model = build(cfg, seed=tc.seed)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    opt = _adamw(_param_groups(model, tc.weight_decay), tc)
    gen = torch.Generator().manual_seed(tc.seed + 1)
    length = tc.seq_len + 2
    val_w = (eval_windows(val_tokens, tc.eval_batches * tc.batch_size, length)
             if val_tokens is not None else None)
    gates = moe_gates(model)
    use_aux = tc.aux_alpha > 0
    n_depth = len(model.mtp)
    log: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, desc=f"train {cfg.name}", unit="step")
    t_start = time.perf_counter()
    try:
        with RoutingRecorder(model, scores=use_aux) as rec:
            for step in range(tc.steps):
                t0 = time.perf_counter()
                lr = lr_at(step, tc)
                for g in opt.param_groups:
                    g["lr"] = lr
                window = sample_windows(train_tokens, tc.batch_size, length, gen)
                rec.reset()
                main, mtp = lm_losses(model, window)
                loss = main
                if mtp:
                    loss = loss + (tc.mtp_lambda / n_depth) * sum(mtp)
                aux = None
                if use_aux:
                    aux = sum(sequence_balance_loss(s, ids, tc.batch_size, g.cfg.num_experts_per_tok)
                              for g, s, ids in zip(rec.gates, rec.scores, rec.topk_ids) if s is not None)
                    loss = loss + tc.aux_alpha * aux
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                counts = rec.counts()
                if tc.bias_gamma:
                    for g, c in zip(gates, counts):
                        if g.has_bias:
                            bias_update(g, c, tc.bias_gamma, tc.bias_centred)
                dt = time.perf_counter() - t0
                row = dict(step=step, loss=float(main.detach()),
                           mtp_loss=(float(sum(mtp).detach()) / len(mtp)) if mtp else None,
                           lr=lr, maxvio=(sum(max_violation(c) for c in counts) / len(counts)) if counts else None,
                           grad_norm=float(gnorm), tokens_per_s=window[:, :tc.seq_len].numel() / dt,
                           elapsed_s=time.perf_counter() - t_start)
                if aux is not None:
                    row["aux_loss"] = float(aux.detach())
                last = step == tc.steps - 1
                out_of_time = tc.max_seconds is not None and row["elapsed_s"] >= tc.max_seconds
                if val_w is not None and ((step + 1) % tc.eval_every == 0 or last or out_of_time):
                    row.update(evaluate(model, val_w, tc.batch_size))
                    model.train()
                log.append(row)
                if bar is not None:
                    bar.update(1)
                    post = dict(loss=f"{row['loss']:.3f}", vio=f"{row['maxvio'] or 0:.2f}")
                    if "val_loss" in row:
                        post["val"] = f"{row['val_loss']:.3f}"
                    bar.set_postfix(post)
                if out_of_time:
                    break
    finally:
        if bar is not None:
            bar.close()
        if flushed:
            torch.set_flush_denormal(False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if log_path:
        write_jsonl(log_path, log)
    return model, log


# --------------------------------------------------------------------------------------------
# logs, figure, text
# --------------------------------------------------------------------------------------------

def jsonl_text(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Write rows as JSON lines atomically: a reader sees the old file or the whole new one."""
    write_bytes_atomic(path, jsonl_text(rows).encode())


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_training_log(log: Sequence[dict], title: str = ""):
    """Loss (train, MTP, validation) and batch MaxVio against step -> matplotlib Figure."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    steps = [r["step"] for r in log]
    k = max(1, len(log) // 40)
    ax.plot(steps, [r["loss"] for r in log], color="C0", alpha=0.25, lw=0.8)
    ax.plot(steps, _smooth([r["loss"] for r in log], k), color="C0", label="train (next token)")
    if log and log[0].get("mtp_loss") is not None:
        ax.plot(steps, _smooth([r["mtp_loss"] for r in log], k), color="C1", label="train MTP (token +2)")
    ev = [r for r in log if "val_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", color="C2", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    vio = [r["maxvio"] for r in log if r.get("maxvio") is not None]
    if vio:
        bx.plot(steps[:len(vio)], vio, color="C3", alpha=0.25, lw=0.8)
        bx.plot(steps[:len(vio)], _smooth(vio, k), color="C3", label="train batch")
        evv = [r for r in ev if "val_maxvio" in r]
        if evv:
            bx.plot([r["step"] for r in evv], [r["val_maxvio"] for r in evv], "o-", color="C2",
                    label="validation")
        bx.legend()
    bx.set_xlabel("step")
    bx.set_ylabel("MaxVio (mean over MoE layers)")
    bx.set_title("expert load imbalance")
    bx.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


@torch.no_grad()
def greedy_continue(model, tok, prompt: str, max_new_tokens: int = 40, eos_id: int = 1,
                    temperature: float = 0.0, seed: int = 0) -> str:
    """Continue ``prompt`` greedily (or sampled at ``temperature``, seeded) by re-forwarding the
    whole sequence each step: no cache, so it depends on nothing but the model's forward."""
    ids = tok.encode(prompt).ids
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        x = torch.tensor([ids], dtype=torch.int64, device=model.device)
        logits = model(x, last_only=True)[0, -1].float()
        if temperature > 0:
            nxt = int(torch.multinomial((logits / temperature).softmax(-1).cpu(), 1, generator=gen))
        else:
            nxt = int(logits.argmax())
        if nxt == eos_id:
            break
        ids.append(nxt)
    return tok.decode(ids)


# --------------------------------------------------------------------------------------------
# the lab model
# --------------------------------------------------------------------------------------------

def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _model_card(info: dict) -> str:
    i = info
    lines = [
        "# dsv3lab lab model",
        "",
        f"A {i['params_m']:.1f}M-parameter DeepSeek-V3-architecture model (preset `lab`: "
        f"{i['layers']} layers, hidden {i['hidden']}, MLA with q/kv low rank, {i['experts']} routed "
        f"experts of width {i['expert_width']} in {i['groups']} groups, top-{i['top_k']}, 1 shared expert, "
        "sigmoid gate with aux-loss-free bias, MTP depth 1, YaRN), trained from scratch on CPU by "
        "`dsv3lab train-lab`. It is a fixture for the lab's notebooks and tests, not a useful language "
        "model: it writes Python-documentation-flavoured English.",
        "",
        "## Data",
        f"- Python {i['python']}'s own text: the reference manual (`pydoc_data.topics`, {i['n_topics']} topics) "
        f"and standard-library docstrings of at least 200 characters, {i['n_docs']} documents, "
        f"{i['chars'] / 1e6:.2f} M characters.",
        f"- Split by whole document (seed {i['seed']}): {i['train_tokens']:,} training tokens, "
        f"{i['val_tokens']:,} validation tokens.",
        f"- Tokenizer: byte-level BPE (`tokenizers`), vocabulary {i['vocab']}, "
        f"{i['chars_per_token']:.2f} characters per token; BOS = 0, EOS = 1 (DeepSeek-V3 spellings).",
        "",
        "## Training",
        f"- {i['steps']} steps of {i['batch_size']} x {i['seq_len']} tokens "
        f"({i['tokens_seen'] / 1e6:.2f} M tokens, {i['epochs']:.2f} epochs) in "
        f"{i['wall_s'] / 60:.1f} min on {i['threads']} CPU thread(s) ({i['tok_s']:.0f} tokens/s, on a "
        "machine shared with other jobs)" + (f"; stopped by the time limit in a {i['schedule_steps']}-step "
        "schedule." if i['schedule_steps'] != i['steps'] else "."),
        f"- AdamW (0.9, 0.95), weight decay 0.1, peak LR {i['lr']:g} with {i['warmup']} warm-up steps "
        f"and cosine decay to {i['lr'] * i['min_lr_ratio']:g}, grad clip 1.0.",
        f"- Loss: next-token CE + MTP loss with lambda = {i['mtp_lambda']} (depth 1).",
        f"- Aux-loss-free balancing: gamma = {i['gamma']} per step (the paper's 0.001 is meant for "
        "~1e5 steps; routing here collapses within a few steps and a few hundred steps must undo "
        "it), paper's uncentred form, no auxiliary loss.",
        "",
        "## Results",
        "",
        "| | value |",
        "|---|---|",
        f"| final train loss (mean of last 20 steps) | {i['train_loss']:.3f} |",
        f"| validation loss (fp32 weights) | {i['val_loss']:.4f} |",
        f"| validation loss (this FP8 checkpoint) | {i['val_loss_fp8']:.4f} |",
        f"| validation MTP loss (token i+2) | {i['val_mtp_loss']:.3f} |",
        f"| unigram cross-entropy on validation | {i['unigram']:.3f} |",
        f"| validation MaxVio at initialisation | {i['maxvio_init']:.2f} |",
        f"| validation MaxVio after training | {i['maxvio_final']:.2f} |",
        f"| ... same weights with the biases zeroed | {i['maxvio_nobias']:.2f} |",
        "",
        "Losses are nats per token; MaxVio = (max load - mean load) / mean load, mean over the "
        f"{i['moe_layers']} MoE layers (MTP's included).",
        "",
        f"Continuations of `{i['prompt']}`, greedy and sampled (temperature 0.8, seed 0):",
        "",
        "```",
        i["sample"],
        "```",
        "",
        "```",
        i["sample_t"],
        "```",
        "",
        "![training curve](training_curve.png)",
        "",
        "## Files",
        "- `config.json`, `model.safetensors.index.json`, `model-*.safetensors`: official HF layout, "
        "FP8 e4m3 weights with 128x128 `weight_scale_inv` (load with `dsv3lab.load`).",
        "- `tokenizer.json`: `tokenizers.Tokenizer.from_file`.",
        "- `training_log.jsonl`: one line per step.",
        "",
        f"Retrain: `{i['command']}`",
        "",
    ]
    return "\n".join(lines)


# The lab run's departures from TrainConfig's defaults (see the model card): a smaller batch
# buys more updates in a 10-minute CPU budget, and a larger bias step lets the biases catch up
# with routing that collapses within the first few steps.
LAB_RUN = dict(batch_size=4, bias_gamma=0.01, threads=1, eval_batches=8)


def train_lab(out: str = "data/lab-model", steps: Optional[int] = None, minutes: Optional[float] = None,
              seed: int = 0, preset: str = "lab", progress: bool = True, **overrides) -> dict:
    """Build the lab's default model into ``out``; returns the numbers of its model card.
    ``steps`` fixes the run (reproducible); ``minutes`` instead times three steps first and
    picks the step count that fits, with a hard stop at that wall time."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from dsv3lab.checkpoint import build, load, save

    cfg = ModelConfig.preset(preset)
    tc = TrainConfig(seed=seed, **{**LAB_RUN, **overrides})
    torch.set_num_threads(tc.threads)
    t0 = time.perf_counter()
    docs = python_docs_corpus()
    from pydoc_data.topics import topics
    train_docs, val_docs = split_documents(docs, 0.05, seed)
    tok = train_tokenizer(train_docs, cfg.vocab_size)
    train_ids = encode_documents(tok, train_docs, cfg.eos_token_id)
    val_ids = encode_documents(tok, val_docs, cfg.eos_token_id)
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M chars; "
          f"{train_ids.numel():,} train / {val_ids.numel():,} val tokens "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    if steps is None:
        minutes = 10.0 if minutes is None else minutes
        probe = dataclasses.replace(tc, steps=3, eval_every=10 ** 9)
        t = time.perf_counter()
        train(cfg, train_ids, None, probe, progress=False)
        per_step = (time.perf_counter() - t) / 3
        steps = max(10, int(minutes * 60 * 0.92 / (per_step * (1 + 0.4 / tc.eval_every * tc.eval_batches))))
        print(f"{per_step:.2f} s/step -> {steps} steps for {minutes:g} min", file=sys.stderr)
        tc = dataclasses.replace(tc, steps=steps, max_seconds=minutes * 60)
    else:
        tc = dataclasses.replace(tc, steps=steps)
    tc = dataclasses.replace(tc, warmup_steps=min(tc.warmup_steps, max(1, tc.steps // 10)))

    val_w = eval_windows(val_ids, tc.eval_batches * tc.batch_size, tc.seq_len + 2)
    init = evaluate(build(cfg, seed=seed), val_w, tc.batch_size)
    model, log = train(cfg, train_ids, val_ids, tc, progress=progress)
    final = evaluate(model, val_w, tc.batch_size)
    saved = [g.e_score_correction_bias.clone() for g in moe_gates(model)]
    for g in moe_gates(model):
        g.e_score_correction_bias.zero_()
    nobias = evaluate(model, val_w, tc.batch_size)
    for g, b in zip(moe_gates(model), saved):
        g.e_score_correction_bias.copy_(b)

    prompt = "The list"
    sample = greedy_continue(model, tok, prompt, 48, cfg.eos_token_id)
    sample_t = greedy_continue(model, tok, prompt, 48, cfg.eos_token_id, temperature=0.8, seed=0)
    wall = log[-1]["elapsed_s"]
    n_tok = len(log) * tc.batch_size * tc.seq_len
    argv = ["python -m dsv3lab train-lab", f"--out {out}", f"--steps {tc.steps}"]
    for flag, key in (("--seed", "seed"), ("--threads", "threads"), ("--batch-size", "batch_size"),
                      ("--lr", "lr"), ("--gamma", "bias_gamma")):
        if key == "seed" and not seed:
            continue
        if key != "seed" and getattr(tc, key) != LAB_RUN.get(key, getattr(TrainConfig, key)):
            argv.append(f"{flag} {getattr(tc, key)}")
    info = dict(
        params_m=sum(p.numel() for p in model.parameters()) / 1e6, layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size, experts=cfg.n_routed_experts, expert_width=cfg.moe_intermediate_size,
        groups=cfg.n_group, top_k=cfg.num_experts_per_tok, python=sys.version.split()[0],
        n_topics=len(topics), n_docs=len(docs), chars=sum(map(len, docs)), seed=seed,
        train_tokens=train_ids.numel(), val_tokens=val_ids.numel(), vocab=cfg.vocab_size,
        chars_per_token=sum(map(len, train_docs)) / train_ids.numel(),
        steps=len(log), batch_size=tc.batch_size, seq_len=tc.seq_len, tokens_seen=n_tok,
        epochs=n_tok / train_ids.numel(), wall_s=wall, threads=tc.threads, tok_s=n_tok / wall,
        lr=tc.lr, warmup=tc.warmup_steps, min_lr_ratio=tc.min_lr_ratio, mtp_lambda=tc.mtp_lambda,
        gamma=tc.bias_gamma,
        train_loss=sum(r["loss"] for r in log[-20:]) / len(log[-20:]),
        val_loss=final["val_loss"], val_mtp_loss=final.get("val_mtp_loss", float("nan")),
        unigram=unigram_cross_entropy(train_ids, val_ids, cfg.vocab_size),
        maxvio_init=init["val_maxvio"], maxvio_final=final["val_maxvio"],
        maxvio_nobias=nobias["val_maxvio"], moe_layers=len(moe_gates(model)),
        prompt=prompt, sample=sample, sample_t=sample_t, command=" ".join(argv), val_loss_fp8=float("nan"),
        schedule_steps=tc.steps)

    save(model, out, fp8=True, extra_files={
        "tokenizer.json": tok.to_str(pretty=False),
        "training_log.jsonl": jsonl_text(log),
        "README.md": _model_card(info)})
    reloaded = load(out, dtype=torch.float32)
    info["val_loss_fp8"] = evaluate(reloaded, val_w, tc.batch_size)["val_loss"]
    write_bytes_atomic(os.path.join(out, "README.md"), _model_card(info).encode())
    fig = plot_training_log(log, f"lab model: {len(log)} steps, {wall / 60:.1f} min on CPU")
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    write_bytes_atomic(os.path.join(out, "training_curve.png"), buf.getvalue())
    info["bytes"] = _dir_bytes(out)
    info["total_s"] = time.perf_counter() - t0
    return info


def add_commands(sub) -> None:
    p = sub.add_parser("train-lab", help="train the lab's default model (CPU, ~10 min) into a directory")
    p.add_argument("--out", default="data/lab-model", help="checkpoint directory (replaced atomically)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="number of steps (reproducible run)")
    g.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget; the step count is fitted to it (default 10 without --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=LAB_RUN["threads"],
                   help="torch threads (1: a shared CPU punishes oversubscribed OpenMP threads)")
    p.add_argument("--batch-size", type=int, default=LAB_RUN["batch_size"])
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--gamma", type=float, default=LAB_RUN["bias_gamma"],
                   help="bias update step (the paper's 0.001 is for ~1e5 steps; a few hundred need more)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train_lab)


def _cmd_train_lab(args) -> int:
    info = train_lab(args.out, steps=args.steps, minutes=args.minutes, seed=args.seed,
                     progress=not args.no_progress, threads=args.threads, lr=args.lr,
                     bias_gamma=args.gamma, batch_size=args.batch_size)
    print(f"{args.out}: {info['steps']} steps in {info['wall_s'] / 60:.1f} min; train {info['train_loss']:.3f}, "
          f"val {info['val_loss']:.3f} (FP8 {info['val_loss_fp8']:.3f}, unigram {info['unigram']:.3f}), "
          f"MTP {info['val_mtp_loss']:.3f}; MaxVio {info['maxvio_init']:.2f} -> {info['maxvio_final']:.2f} "
          f"(biases zeroed {info['maxvio_nobias']:.2f}); {info['bytes'] / 1e6:.1f} MB")
    print(f"sample: {info['sample']!r}")
    return 0
