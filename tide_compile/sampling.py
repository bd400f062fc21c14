"""Sampling helpers shared by the reference, the compiled model and lossless mode.

How the next token is picked from logits (greedy, or temperature / top-k / top-p as HF
does), the EOS and pad ids as ``model.generate`` resolves them, and the position ids
that skip left padding. One statement of each, so every path samples alike.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["eos_and_pad", "sample_next", "processed_probs", "position_ids_from_mask"]


def eos_and_pad(model: nn.Module, eos_token_id: int | list[int] | None,
                pad_token_id: int | None) -> tuple[list[int], int]:
    """EOS ids and the pad id as ``model.generate`` resolves them: the arguments, else
    ``model.generation_config``; pad falls back to the first EOS id, else 0."""
    gen_cfg = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
    eos = ([] if eos_token_id is None
           else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return eos, int(pad_token_id)


def sample_next(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids ``[batch]`` from last-position logits ``[batch, vocab]``.

    Greedy takes the argmax; sampling applies temperature, then top-k, then top-p
    (the smallest set of tokens whose probability reaches ``top_p``), as HF does.
    """
    if not do_sample:
        return logits.argmax(-1)
    probs = processed_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def processed_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Sampling probabilities ``[..., vocab]`` (float32) from logits: temperature, then
    top-k, then top-p (the smallest set of tokens whose probability reaches ``top_p``)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    scores = logits.float() / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as HF generate computes them."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)
