"""Expert specialisation: which experts take which kinds of token, from the text itself.

Token classes (``classify_text`` per character, ``token_classes`` per model token):
  * domain -- ``code`` or ``prose``. A line is code when it is indented or starts with a doctest
    prompt (``>>>``, ``...``): how Python's manual and docstrings lay out examples and grammar
    (the lab corpus's prose paragraphs are unwrapped to single unindented lines). Runs of code lines,
    blank lines between them included, form one code block.
  * kind -- in code, from Python's own ``tokenize`` on the block (dedented, prompts stripped, with
    offsets mapped back): ``identifier``, ``keyword`` (hard and soft keywords), ``digits``
    (NUMBER), ``string``, ``comment``, ``punctuation`` (OP and prompts), ``whitespace``; a block
    ``tokenize`` rejects (grammar, output) falls back line by line, then to character classes. In
    prose: ``word``, ``digits``, ``punctuation``, ``whitespace`` by character class.
  * a model token takes the class of its first non-whitespace character (``whitespace`` when it
    has none); its label is ``"domain:kind"``.

Statistics over routing (``topk_ids`` [L,N,k], one class label per token; every selected slot
counts once, so a token contributes k selections per layer):
  * ``p_expert_given_class`` [L,C,E] routing distribution of each class; ``p_expert`` [L,E] overall.
  * ``jsd_expert`` [L,E]: Jensen-Shannon divergence (bits, in [0, 1]) between the class mix of the
    tokens an expert receives, P(class | e), and the class mix of all tokens, P(class): 0 = the
    expert sees the corpus as it is, 1 = it sees classes that are otherwise absent. NaN for an
    expert that received nothing.
  * ``jsd_class`` [L,C]: JSD between P(e | class) and P(e): how differently a class is routed.
  * ``lift`` [L,C,E] = P(e | class) / P(e); ``most_selective(layer, cls)`` ranks experts by lift
    among those with at least ``min_count`` selections of that class.
  * ``coactivation`` [L-1,E,E]: tokens that chose e in one MoE layer and f in the next, with
    P(f | e) and lift against independence.
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

CODE_KINDS = ("identifier", "keyword", "digits", "string", "comment", "punctuation", "whitespace")
PROSE_KINDS = ("word", "digits", "punctuation", "whitespace")
_PROMPT = re.compile(r"^(>>>|\.\.\.)( |$)")


def _char_kind(ch: str, domain: str) -> str:
    if ch.isspace():
        return "whitespace"
    if ch.isdigit():
        return "digits"
    if ch.isalpha() or ch == "_":
        return "identifier" if domain == "code" else "word"
    return "punctuation"


def _is_code_line(line: str) -> bool:
    return bool(line.strip()) and (line[:1] in (" ", "\t") or bool(_PROMPT.match(line)))


def _tokenize_kinds(src_lines: list[str]) -> Optional[list[tuple[int, int, int, str]]]:
    """(row, col_start, col_end, kind) for Python tokens of the given lines, or None if tokenize
    rejects them."""
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO("\n".join(src_lines) + "\n").readline):
            t = tok.type
            if t == tokenize.NAME:
                hard_or_soft = keyword.iskeyword(tok.string) or keyword.issoftkeyword(tok.string)
                kind = "keyword" if hard_or_soft else "identifier"
            elif t == tokenize.NUMBER:
                kind = "digits"
            elif t == tokenize.STRING or tokenize.tok_name.get(t, "").startswith("FSTRING"):
                kind = "string"
            elif t == tokenize.COMMENT:
                kind = "comment"
            elif t in (tokenize.OP, tokenize.ERRORTOKEN) and tok.string.strip():
                kind = "punctuation"
            else:
                continue
            (r0, c0), (r1, c1) = tok.start, tok.end
            for r in range(r0, r1 + 1):                       # multi-line strings span rows
                a = c0 if r == r0 else 0
                b = c1 if r == r1 else len(src_lines[r - 1]) if r - 1 < len(src_lines) else 0
                out.append((r - 1, a, b, kind))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    return out


def classify_text(text: str) -> tuple[list[str], list[str]]:
    """(domain, kind) of every character of ``text`` (module docstring)."""
    lines = text.split("\n")
    starts, pos = [], 0
    for ln in lines:
        starts.append(pos)
        pos += len(ln) + 1
    code = [_is_code_line(ln) for ln in lines]
    # blank lines between two code lines belong to the code block
    for i, ln in enumerate(lines):
        if not ln.strip() and not code[i]:
            before = next((code[j] for j in range(i - 1, -1, -1) if lines[j].strip()), False)
            after = next((code[j] for j in range(i + 1, len(lines)) if lines[j].strip()), False)
            code[i] = before and after
    domain = ["prose"] * len(text)
    kind = [_char_kind(c, "prose") for c in text]
    i = 0
    while i < len(lines):
        if not code[i]:
            i += 1
            continue
        j = i
        while j < len(lines) and code[j]:
            j += 1
        _classify_code_block(text, lines[i:j], starts[i:j], domain, kind)
        i = j
    # a newline ending a line takes the domain of the line after it (what the next token starts)
    for r in range(len(lines) - 1):
        nl = starts[r + 1] - 1
        domain[nl] = "code" if code[r + 1] else "prose"
    return domain, kind


def _classify_code_block(text, block: list[str], starts: list[int], domain, kind):
    for ln, s in zip(block, starts):
        for c in range(len(ln)):
            domain[s + c] = "code"
            kind[s + c] = _char_kind(ln[c], "code")
    # strip a common indent, then doctest prompts (marked as punctuation), keeping column shifts
    indent = min((len(ln) - len(ln.lstrip()) for ln in block if ln.strip()), default=0)
    src, shift = [], []
    for ln, s in zip(block, starts):
        body = ln[indent:] if len(ln) >= indent else ""
        m = _PROMPT.match(body)
        cut = indent
        if m:
            for c in range(len(m.group(0))):
                if not body[c].isspace():
                    kind[s + indent + c] = "punctuation"
            body = body[len(m.group(0)):]
            cut += len(m.group(0))
        src.append(body)
        shift.append(cut)
    spans = _tokenize_kinds(src)
    if spans is None:                                         # line by line, then characters
        spans = []
        for r, body in enumerate(src):
            got = _tokenize_kinds([body.strip()]) if body.strip() else []
            if got is None:
                continue
            lead = len(body) - len(body.lstrip())
            spans.extend((r, a + lead, b + lead, k) for _, a, b, k in got)
    for r, a, b, k in spans:
        if r >= len(src):
            continue
        base = starts[r] + shift[r]
        for c in range(a, min(b, len(src[r]))):
            kind[base + c] = k
    for ln, s in zip(block, starts):                          # whitespace stays whitespace
        for c, ch in enumerate(ln):
            if ch.isspace():
                kind[s + c] = "whitespace"


def token_spans(codec, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and their character spans, from a ``TextCodec`` (tokenizer or UTF-8 bytes) or a
    ``tokenizers.Tokenizer``."""
    tok = codec if hasattr(codec, "get_vocab") else getattr(codec, "tokenizer", None)
    if tok is not None:
        enc = tok.encode(text)
        return list(enc.ids), [tuple(o) for o in enc.offsets]
    ids, spans = [], []
    for i, ch in enumerate(text):
        for b in ch.encode("utf-8"):
            ids.append(b % getattr(codec, "vocab_size", 256))
            spans.append((i, i + 1))
    return ids, spans


def token_classes(codec, text: str) -> dict:
    """``ids`` [N], ``domain`` / ``kind`` / ``label`` (lists of N strings) for the tokens of ``text``."""
    ids, spans = token_spans(codec, text)
    dom, kin = classify_text(text)
    domain, kind = [], []
    for a, b in spans:
        pick = next((c for c in range(a, b) if not text[c].isspace()), None)
        if pick is None:
            domain.append(dom[a] if a < len(text) else "prose")
            kind.append("whitespace")
        else:
            domain.append(dom[pick])
            kind.append(kin[pick])
    return dict(ids=ids, domain=domain, kind=kind, label=[f"{d}:{k}" for d, k in zip(domain, kind)])


def _jsd_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits along the last axis (0 log 0 = 0)."""
    m = 0.5 * (p + q)
    def kl(a, b):
        return torch.where(a > 0, a * (a / b.clamp_min(1e-300)).log2(), torch.zeros_like(a)).sum(-1)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@dataclass
class Specialisation:
    classes: list                     # C class labels
    layers: list                      # L block indices
    counts: torch.Tensor              # [L,C,E] selections of expert e by tokens of class c
    class_tokens: torch.Tensor        # [C] tokens per class
    p_expert_given_class: torch.Tensor    # [L,C,E]
    p_expert: torch.Tensor            # [L,E]
    p_class: torch.Tensor             # [C]
    p_class_given_expert: torch.Tensor    # [L,C,E] (NaN for unused experts)
    jsd_expert: torch.Tensor          # [L,E] bits
    jsd_class: torch.Tensor           # [L,C] bits
    lift: torch.Tensor                # [L,C,E]
    top_k: int = 1
    extra: dict = field(default_factory=dict)

    def most_selective(self, layer_index: int, cls: str, n: int = 3, min_count: int = 5) -> list[dict]:
        """Experts of MoE layer ``layer_index`` (position in ``layers``) with the highest lift for
        ``cls`` among those chosen at least ``min_count`` times by it."""
        c = self.classes.index(cls)
        cnt = self.counts[layer_index, c]
        lift = self.lift[layer_index, c].masked_fill(cnt < min_count, float("-inf"))
        order = lift.argsort(descending=True)[:n]
        return [dict(expert=int(e), lift=float(self.lift[layer_index, c, e]), count=int(cnt[e]),
                     share_of_class=float(self.p_expert_given_class[layer_index, c, e]))
                for e in order if lift[e] > float("-inf")]


def expert_specialisation(topk_ids: torch.Tensor, labels: Sequence[str], n_experts: int,
                   classes: Optional[Sequence[str]] = None, layers: Optional[Sequence[int]] = None) -> Specialisation:
    """Routing statistics per token class (module docstring). ``topk_ids`` [L,N,k]; ``labels`` N strings."""
    if topk_ids.dim() != 3:
        raise ValueError(f"topk_ids must be [layers, tokens, top_k], got shape {tuple(topk_ids.shape)}")
    L, N, k = topk_ids.shape
    if len(labels) != N:
        raise ValueError(f"{len(labels)} labels for {N} routed tokens")
    classes = sorted(set(labels)) if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among classes {classes}")
    cls = torch.tensor([index[x] for x in labels], dtype=torch.int64)
    C, E = len(classes), n_experts
    flat = cls[:, None].expand(N, k).reshape(-1) * E                             # [N*k]
    counts = torch.stack([torch.bincount(flat + topk_ids[l].reshape(-1).cpu(), minlength=C * E).view(C, E)
                          for l in range(L)]).double()
    class_tokens = torch.bincount(cls, minlength=C).double()
    p_e_c = counts / (class_tokens[None, :, None] * k).clamp_min(1e-300)
    p_e = counts.sum(1) / (N * k)
    p_c = class_tokens / N
    per_e = counts.sum(1, keepdim=True)
    p_c_e = torch.where(per_e > 0, counts / per_e.clamp_min(1e-300), torch.full_like(counts, float("nan")))
    jsd_e = _jsd_bits(p_c_e.permute(0, 2, 1), p_c.expand(L, E, C))
    jsd_e = jsd_e.masked_fill(per_e[:, 0] == 0, float("nan"))
    jsd_c = _jsd_bits(p_e_c, p_e[:, None, :].expand(L, C, E))
    lift = p_e_c / p_e[:, None, :].clamp_min(1e-300)
    return Specialisation(classes=classes, layers=list(layers) if layers is not None else list(range(L)),
                          counts=counts, class_tokens=class_tokens, p_expert_given_class=p_e_c, p_expert=p_e,
                          p_class=p_c, p_class_given_expert=p_c_e, jsd_expert=jsd_e, jsd_class=jsd_c,
                          lift=lift, top_k=k)


def coactivation(topk_ids: torch.Tensor, n_experts: int) -> dict:
    """Experts chosen by the same token in consecutive MoE layers: ``counts`` [L-1,E,E] (e in
    layer l, f in layer l+1), ``conditional`` P(f at l+1 | e at l), ``lift`` = observed / expected
    under independent layers (counts * N / (n_l(e) n_{l+1}(f)))."""
    L, N, k = topk_ids.shape
    E = n_experts
    onehot = torch.zeros(L, N, E, dtype=torch.float64)
    onehot.scatter_(2, topk_ids.cpu(), 1.0)
    counts = torch.einsum("lne,lnf->lef", onehot[:-1], onehot[1:])
    n_l = onehot.sum(1)                                                           # [L,E]
    cond = counts / n_l[:-1, :, None].clamp_min(1e-300)
    expected = n_l[:-1, :, None] * n_l[1:, None, :] / max(N, 1)
    lift = torch.where(expected > 0, counts / expected.clamp_min(1e-300), torch.full_like(counts, float("nan")))
    return dict(counts=counts, conditional=cond, lift=lift)


@torch.no_grad()
def routing_by_class(model, codec, texts: Sequence[str], length: int = 128, max_windows: int = 8,
                     eos_id: int = 1) -> dict:
    """Run ``model`` over ``texts`` (each tokenised alone, EOS between, cut into windows of
    ``length``) under a routing trace; return ``topk_ids`` [L,N,k], ``labels`` (N strings; EOS is
    ``special``), ``ids`` [N] and the traced ``layers``."""
    from dsv3lab.probes import trace
    ids, labels = [], []
    for t in texts:
        c = token_classes(codec, t)
        ids += c["ids"] + [eos_id]
        labels += c["label"] + ["special"]
        if len(ids) >= length * max_windows:
            break
    n = min(max_windows, len(ids) // length)
    if n == 0:
        raise ValueError(f"the texts give {len(ids)} tokens, fewer than one window of {length}")
    windows = torch.tensor(ids[:n * length], dtype=torch.int64).view(n, length)
    with trace(model, mtp=False) as tr:
        model(windows.to(model.device))
    r = tr.routing
    return dict(topk_ids=r.topk_ids, labels=labels[:n * length], ids=windows.flatten(), layers=r.layers)
