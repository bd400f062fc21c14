"""Draft verification for lossless mode: the speculative-sampling acceptance rule.

:mod:`.lossless` (``optimize(model, routers, mode="lossless")``) drafts tokens at the
routers' exits and verifies them with the full model's logits of its deep steps; this
module holds the acceptance rules it uses:

* :func:`verify_drafts`: accept a round's drafts against the full-depth logits, with one
  host read. Greedy: the longest prefix of drafts equal to the full model's argmax, then
  the full model's next token. Sampling: :func:`speculative_accept`.
* :func:`speculative_accept`: the speculative-sampling rule (Leviathan et al. 2023,
  Chen et al. 2023), on the device: accept draft ``x`` with probability
  ``min(1, p(x)/q(x))``; at the first rejection sample from ``norm(max(0, p - q))``; if
  all are accepted, sample the next token from ``p``. Temperature, top-k and top-p are
  applied to ``p`` and ``q`` alike (:func:`..sampling.processed_probs`). Every emitted
  token is then distributed as the plain model's sampling given its prefix.

The module's name is historical: it also held ``SpeculativeModel``
(``mode="speculative"``: drafts verified by a separate full-depth forward), removed
because ``mode="lossless"`` gives the same output and measured faster on every row
(docs/lossless.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..sampling import processed_probs

__all__ = ["speculative_accept", "verify_drafts", "Verdict"]


# ---------------------------------------------------------------------- sampling
def speculative_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor,
                       target_probs: torch.Tensor, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling acceptance rule, on the device, without host reads.

    Args:
        draft_tokens: ``[n]``, drafted with ``draft_tokens[i] ~ draft_probs[i]``.
        draft_probs: ``[n, vocab]``, the draft's (processed) distributions ``q_i``.
        target_probs: ``[n + 1, vocab]``, the verifier's ``p_i`` at the same positions
            plus the one after the last draft.
        generator: random numbers (n uniforms, then one multinomial draw).

    Returns:
        ``(k, token)``: 0-d tensors; the first ``k`` drafts are accepted, ``token`` follows
        them. Draft ``i`` is accepted with probability ``min(1, p_i(x) / q_i(x))`` (as
        ``u * q < p``, ``u ~ U[0, 1)``); at the first rejection ``token`` is drawn from
        ``norm(max(0, p_k - q_k))``, and after ``n`` acceptances from ``p_n``. Every
        emitted token is then distributed exactly as ``p`` given its prefix.
    """
    n = draft_tokens.numel()
    device = target_probs.device
    rows = torch.arange(n, device=device)
    p_sel = target_probs[rows, draft_tokens]
    q_sel = draft_probs[rows, draft_tokens]
    u = torch.rand(n, generator=generator, device=device)
    accepted = (u * q_sel < p_sel).long()
    k = accepted.cumprod(0).sum()
    residual = (target_probs[:n] - draft_probs).clamp_min(0)
    candidates = torch.cat([residual, target_probs[n:n + 1]], 0)
    row = candidates[k]
    # p == q at a rejected draft has probability 0; guard against rounding anyway.
    row = torch.where(row.sum() > 0, row, target_probs[k])
    token = torch.multinomial(row, 1, generator=generator)[0]
    return k, token


@dataclass
class Verdict:
    """What a full-depth verify made of a round's drafts (:func:`verify_drafts`).

    Attributes:
        accepted: ``k``, the drafts accepted (a prefix).
        next_token: the token after them (0-d, on the device): the verifier's own.
        emitted: the tokens the round yields, on the host: the accepted drafts, then
            ``next_token``; cut after the first EOS and to the room left.
        ended: an EOS is among ``emitted``.
        regrets: drafts whose exit top-1 differs from the verifier's top-1 at their
            position (a device tensor when sampling, else an int).
    """

    accepted: int
    next_token: torch.Tensor
    emitted: list[int]
    ended: bool
    regrets: torch.Tensor | int


def verify_drafts(full: torch.Tensor, drafts: torch.Tensor, *, eos: set[int], room: int,
                  sampling: dict[str, Any] | None = None,
                  draft_probs: torch.Tensor | None = None,
                  exit_tops: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> Verdict:
    """Accept a round's drafts against the full model's logits (one host read).

    Args:
        full: ``[m + 1, vocab]`` full-depth logits: at the position before each draft,
            and after the last one.
        drafts: ``[m]`` draft tokens.
        eos: end-of-sequence ids; ``room``: tokens the generate may still emit.
        sampling: ``None`` for greedy (accept while the argmax equals the draft); else
            the processing (``temperature``, ``top_k``, ``top_p``) of :func:`speculative_accept`,
            which then needs ``draft_probs`` (``[m, vocab]``) and ``exit_tops`` (``[m]``,
            for the regret count; greedy drafts are their exit tops).
    """
    m = drafts.numel()
    if sampling is not None:
        p = processed_probs(full, **sampling)
        k_t, next_t = speculative_accept(drafts, draft_probs if m else p[:0], p, generator)
        host = torch.cat([k_t.reshape(1), next_t.reshape(1), drafts]).tolist()
        k, next_tok, draft_list = host[0], host[1], host[2:]
        regrets: torch.Tensor | int = (full[:m].argmax(-1) != exit_tops).sum() if m else 0
    else:
        target = full.argmax(-1)
        host = torch.cat([target, drafts]).tolist()
        target_list, draft_list = host[:m + 1], host[m + 1:]
        k = 0
        while k < m and draft_list[k] == target_list[k]:
            k += 1
        next_tok, next_t = target_list[k], target[k]
        regrets = sum(a != b for a, b in zip(draft_list, target_list))
    emitted = draft_list[:k] + [next_tok]
    ended = False
    for i, t in enumerate(emitted):
        if t in eos:
            emitted, ended = emitted[:i + 1], True
            break
    return Verdict(k, next_t, emitted[:room], ended, regrets)
