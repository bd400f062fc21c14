"""The exit head's own confidence over a few candidate tokens, as router input (issue 20).

A router with confidence features (``RouterSet.features == ("rms", "conf")``) scores a
token at checkpoint ``c`` from ``rms(h_c)`` *and* from how sure the exit head is there:

- **candidates**: ``k`` token ids per input token, looked up in a successor table built
  at calibration (:func:`successor_table`: for each input id, the tokens the full model
  most often predicts after it, then the globally most frequent ones). Always available,
  one row per token, ``vocab x k`` ints in all;
- **candidate logits**: ``lm_head.weight[S] @ x`` with ``x`` the state ``lm_head`` reads at
  the exit, ``final_norm(E_c(h_c))`` (:func:`candidate_logits`): ``k`` rows of ``lm_head``
  per token and checkpoint, never the whole vocabulary;
- **features** (:data:`COLUMNS`, :func:`confidence_features`): over those ``k`` logits, the
  top softmax probability, the margin between the top two probabilities, the entropy
  over ``log k``, the top logit and the top-two logit margin.

``benchmarks/router_features.py`` measured these inputs on SmolLM2 (docs/router_features.md).
"""

from __future__ import annotations

import math
from collections import Counter

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model_probe import ModelProbe

__all__ = ["COLUMNS", "successor_table", "candidate_logits", "confidence_features",
           "head_confidence", "exit_head_features"]

#: The feature columns, in the order routers read them.
COLUMNS = ("max_prob", "margin", "entropy", "top_logit", "logit_margin")


def successor_table(ids: torch.Tensor, final_top1: torch.Tensor, vocab: int, k: int) -> torch.Tensor:
    """``[vocab, k]`` int64 candidate table.

    Row ``t`` holds the ``k`` tokens the full model predicted most often at positions whose
    input token is ``t`` (``ids[i] == t``, prediction ``final_top1[i]``), ties broken by
    token id, then the globally most predicted tokens, then the lowest ids: no duplicates
    within a row.

    Args:
        ids: ``[n]`` input token ids.
        final_top1: ``[n]`` the full model's top-1 at those positions.
        vocab: rows of the table (the model's vocabulary size).
        k: candidates per row, ``1 <= k <= vocab``.
    """
    if not 1 <= k <= vocab:
        raise ValueError(f"successor_table: k must be in [1, {vocab}], got {k}")
    ids, final_top1 = ids.reshape(-1).tolist(), final_top1.reshape(-1).tolist()
    if len(ids) != len(final_top1):
        raise ValueError("successor_table: ids and final_top1 differ in length")
    overall = [t for t, _ in sorted(Counter(final_top1).items(), key=lambda kv: (-kv[1], kv[0]))]
    fill = overall + [t for t in range(min(vocab, k + len(overall))) if t not in set(overall)]
    table = torch.tensor(fill[:k], dtype=torch.long).repeat(vocab, 1)
    per: dict[int, Counter] = {}
    for x, y in zip(ids, final_top1):
        per.setdefault(x, Counter())[y] += 1
    for x, cnt in per.items():
        row = [t for t, _ in sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0]))][:k]
        seen = set(row)
        row += [t for t in fill if t not in seen][: k - len(row)]
        table[x] = torch.tensor(row, dtype=torch.long)
    return table


def candidate_logits(weight: torch.Tensor, x: torch.Tensor, idx: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``k`` candidate tokens per position, reading ``k`` rows of ``lm_head``.

    Args:
        weight: ``lm_head.weight``, ``[V, H]``.
        x: what ``lm_head`` reads, ``[..., H]``.
        idx: candidate ids, ``[..., k]``.
        bias: ``lm_head.bias`` (``[V]``), if the head has one.

    Returns:
        ``[..., k]`` float32: ``weight[idx] @ x (+ bias[idx])``.
    """
    z = (weight[idx].float() * x.float().unsqueeze(-2)).sum(-1)
    return z if bias is None else z + bias[idx].float()


def confidence_features(z: torch.Tensor) -> torch.Tensor:
    """The :data:`COLUMNS` of candidate logits ``z`` (``[..., k]``, ``k >= 2``): ``[..., 5]`` float32."""
    z = z.float()
    k = z.shape[-1]
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    # The top two by a max and a max with the first's position masked, not topk: the same
    # values (ties included; softmax keeps the order), and reductions that Inductor fuses
    # into the softmax's kernels instead of a topk call per tensor.
    first = torch.nn.functional.one_hot(z.argmax(-1), k).bool()
    z1 = z.amax(-1)
    z2 = z.masked_fill(first, -math.inf).amax(-1)
    p1 = p.amax(-1)
    p2 = p.masked_fill(first, -math.inf).amax(-1)
    entropy = -(p * logp).sum(-1) / math.log(k)
    return torch.stack([p1, p1 - p2, entropy, z1, z1 - z2], dim=-1)


def head_confidence(x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The :data:`COLUMNS` of ``lm_head`` (``weight``, ``bias``) over the candidates ``idx``
    (``k`` per position of ``x``, in any leading shape), read from ``x``: ``[..., 5]``."""
    idx = idx.reshape(*x.shape[:-1], idx.shape[-1])
    return confidence_features(candidate_logits(weight, x, idx, bias))


def exit_head_features(model: "ModelProbe", state: torch.Tensor, input_ids: torch.Tensor,
                       successor: torch.Tensor) -> torch.Tensor:
    """:func:`head_confidence` of the exit head that reads ``state`` (``E_c(h_c)``): ``lm_head``
    over ``successor[input_ids]``, read from ``final_norm(state)`` (then ``project_out``)."""
    x = model.final_norm(state)
    if model.project_out is not None:
        x = model.project_out(x)
    idx = successor[input_ids.to(successor.device)].to(x.device)
    head = model.lm_head
    return head_confidence(x, head.weight, idx, getattr(head, "bias", None))
