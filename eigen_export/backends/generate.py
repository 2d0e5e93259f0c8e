from __future__ import annotations

from typing import Callable

import torch

from ..modeling import default_position_ids


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        # drop tokens once the mass before them already reaches top_p (the first token always stays)
        drop = cumulative - torch.softmax(sorted_logits, -1) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(backend, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: tuple[int, ...] = (), seed: int = 0, pad_token_id: int = 0,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Prefill the (left-padded) prompts, then decode one token at a time with the backend's cache.

    Returns [B, max_new_tokens] new tokens; a sequence that hit a stop token is padded with pad_token_id.
    `on_token` receives each step's tokens (streaming).
    """
    device = backend.device
    input_ids = input_ids.to(device)
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)).long()
    generator = torch.Generator().manual_seed(seed)
    positions = default_position_ids(mask, 0)
    logits, past = backend.forward(input_ids, mask, positions, None)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_tokens), device=device, dtype=torch.long)
    out = []
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        out.append(token)
        if on_token is not None:
            on_token(token)
        done |= torch.isin(token, stop)
        if done.all() or step == max_new_tokens - 1:
            break
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits, past = backend.forward(token[:, None], mask, positions, past)
    return torch.stack(out, dim=1)
