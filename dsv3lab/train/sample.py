"""Text from a model, with nothing but its forward: the model card's samples."""

from __future__ import annotations

import torch


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
