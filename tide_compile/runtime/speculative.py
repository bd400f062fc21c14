"""Lossless mode: self-speculative decoding with early-exit drafts.

``fast = optimize(model, routers, mode="speculative", max_draft=4)`` returns a
:class:`SpeculativeModel`. Its :meth:`~SpeculativeModel.generate` decodes with two compiled
functions of the same model sharing one ``StaticCache``:

* the **draft** step: the ``tide`` backend (skip strategy, one token per call). Tokens
  that exit early cost only the layers up to their exit (plus the KV-fill of the rest).
  Drafting stops after ``max_draft`` tokens, or after a step whose token did not exit
  within ``max_draft_depth`` layers (it exited deeper, or not at all).
* the **verify** step: the plain model forward (Inductor, or Dynamo's eager backend with
  ``inductor=False``), full depth, on ``[last accepted token, drafts..]`` at their
  positions, always ``max_draft + 1`` tokens wide (padded: one static shape, one graph).
  It overwrites the drafts' propagated K/V with exact ones.

Greedy: accept the longest prefix of drafts equal to the verifier's argmax, plus the
verifier's next token. Sampling: the speculative-sampling rule (Leviathan et al. 2023,
Chen et al. 2023): accept draft ``x`` with probability ``min(1, p(x)/q(x))``; at the first
rejection sample from ``norm(max(0, p - q))``; if all are accepted, sample the next token
from ``p``. Temperature, top-k and top-p are applied to ``p`` and ``q`` alike
(:func:`..sampling.processed_probs`, the processing of :func:`..sampling.sample_next`).
The output is the plain model's: token-identical under greedy decoding (up to
floating-point ties), distributed as plain sampling under sampling.

Cache rollback. A transformers 5.x ``StaticLayer`` writes K/V at the index held in its
``cumulative_length`` tensor and bumps it in place inside the graph; the attention mask's
query offset is layer 0's counter. Rolling back is ``counter.fill_(n)`` on every layer,
in place: compiled graphs and captured CUDA graphs hold the tensor's address. Rows
past the counter are stale but never read (causal mask) and are overwritten before
they are. Nothing else in a ``StaticCache`` tracks the length. Sliding-window layers
(a Python-int counter and a rolling buffer) cannot be rolled back and are refused.
Models whose forward takes ``cache_position`` (older transformers) get it explicitly.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..options import parse_options
from ..routers import FORCE_LOGIT, RouterSet
from ..sampling import eos_and_pad, processed_probs
from ..stats import ExitStats

__all__ = [
    "SpeculativeModel",
    "SpeculativeStats",
    "speculative_accept",
    "verify_drafts",
    "Verdict",
    "set_cache_length",
]


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


# ---------------------------------------------------------------------- cache rollback
def check_rollback(cache: Any) -> None:
    """Raise unless every layer of ``cache`` can be rolled back by :func:`set_cache_length`."""
    if getattr(cache, "offloading", False):
        raise NotImplementedError("speculative mode does not support an offloaded StaticCache")
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            raise NotImplementedError(
                f"cache layer {i} ({type(layer).__name__}) is a sliding-window layer: its "
                "rolling buffer cannot be rolled back, so speculative mode does not support "
                "sliding-window attention; use optimize(model, routers) (mode='exit')"
            )


def set_cache_length(cache: Any, length: int) -> None:
    """Make every layer of a ``StaticCache`` hold ``length`` tokens: the next write goes to
    index ``length``. In place (``fill_``): compiled graphs hold the counters' addresses.
    Layers without a tensor counter (older transformers: write index = ``cache_position``)
    need nothing."""
    for layer in cache.layers:
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(length)


def _forced_at(routers: RouterSet, layer: int) -> RouterSet:
    """A copy of ``routers`` whose router at ``layer`` scores exactly 1 (every token exits)."""
    forced = copy.deepcopy(routers)
    r = forced.router(layer)
    with torch.no_grad():
        for param in r.parameters():
            param.zero_()
        r.up.bias.fill_(FORCE_LOGIT)  # score exactly 1: above any threshold < 1
    return forced


# ---------------------------------------------------------------------- stats
@dataclass
class SpeculativeStats:
    """Counters of speculative decoding.

    Attributes:
        num_layers: decoder layers in the model.
        verify_calls: full-depth verify forwards (one per draft round).
        drafted: draft tokens proposed.
        accepted: draft tokens accepted.
        tokens: tokens the rounds emitted (accepted drafts + one per round, cut at EOS and
            ``max_new_tokens``; the prefill's first token is not counted).
        draft_steps: draft forwards.
        draft_depths: layers computed by a draft forward -> how many (``c + 1`` for an
            exit at checkpoint ``c``, ``num_layers`` for none).
    """

    num_layers: int
    verify_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    draft_steps: int = 0
    draft_depths: dict[int, int] = field(default_factory=dict)

    def record_round(self, depths: list[int], accepted: int, emitted: int) -> None:
        self.verify_calls += 1
        self.drafted += len(depths)
        self.accepted += accepted
        self.tokens += emitted
        self.draft_steps += len(depths)
        for d in depths:
            self.draft_depths[d] = self.draft_depths.get(d, 0) + 1

    @property
    def rejected(self) -> int:
        return self.drafted - self.accepted

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verify(self) -> float:
        """Tokens emitted per full-depth forward."""
        return self.tokens / self.verify_calls if self.verify_calls else 0.0

    @property
    def mean_draft_length(self) -> float:
        """Draft tokens per round."""
        return self.drafted / self.verify_calls if self.verify_calls else 0.0

    @property
    def mean_draft_depth(self) -> float:
        """Mean layers computed per draft forward (KV-fill not counted)."""
        if not self.draft_steps:
            return 0.0
        return sum(d * n for d, n in self.draft_depths.items()) / self.draft_steps

    def reset(self) -> None:
        self.verify_calls = self.drafted = self.accepted = self.tokens = self.draft_steps = 0
        self.draft_depths = {}

    def summary(self) -> str:
        depths = ", ".join(f"{d}: {n}" for d, n in sorted(self.draft_depths.items()))
        return "\n".join([
            f"Verify calls: {self.verify_calls}, tokens: {self.tokens} "
            f"({self.tokens_per_verify:.2f} per verify)",
            f"Drafted: {self.drafted}, accepted: {self.accepted} "
            f"({100.0 * self.acceptance_rate:.1f}%), {self.mean_draft_length:.2f} per round",
            f"Mean draft depth: {self.mean_draft_depth:.2f} / {self.num_layers} layers"
            + (f" (depth: steps {{{depths}}})" if depths else ""),
        ])

    def __str__(self) -> str:
        return self.summary()


# ---------------------------------------------------------------------- the model
class SpeculativeModel(nn.Module):
    """A causal LM decoding losslessly with early-exit drafts (batch 1).

    Args:
        model: an HF causal LM (eval mode, no sliding-window attention).
        routers: routers made for ``model``.
        max_draft: at most this many draft tokens per round (>= 1); the verify forward is
            ``max_draft + 1`` tokens wide.
        max_draft_depth: a draft step that computed more than this many layers (an exit
            at checkpoint ``c`` computes ``c + 1``; no exit computes all) ends the round.
            Default ``num_layers - 1``: any exit continues the draft.
        cap_drafts: draft steps stop computing at the first checkpoint deeper than
            ``max_draft_depth`` (the token exits there by force and ends the draft)
            instead of running to full depth. The drafts' routers are then a copy
            (``draft_routers``) with that checkpoint's router forced to exit.
        verify_mode: ``torch.compile`` mode of the verifier; default
            ``"reduce-overhead"`` for a CUDA model compiled with Inductor, else None.
        options: the ``tide`` backend options of the draft (``exit_threshold``,
            ``min_layers``, ``inductor``, ``inductor_config``, ``mode``, ``cuda_graphs``;
            ``strategy`` defaults to ``"skip"``). ``inductor`` also picks the verifier's
            backend (Inductor, else Dynamo's ``"eager"``).

    Attributes:
        tide_stats: ``ExitStats`` of every :meth:`generate` call, the same kind of record
            as a :class:`~.model.TIDEModel`'s in every mode. It counts the prompt tokens
            (every layer, strategy ``"plain"``: the eager prefill) and one token per decode
            forward: a draft with its exit checkpoint and the layers it computed (the
            draft runner's strategy), a verify with every layer (``"verify"``, as wide as
            the round). Exit regret (``regret_rate``) is the drafts' top-1 against the
            verify's.
        spec_stats: :class:`SpeculativeStats` over every :meth:`generate` call.
        draft_stats: ``ExitStats`` of every draft forward.
    """

    def __init__(self, model: nn.Module, routers: RouterSet, *, max_draft: int = 4,
                 max_draft_depth: int | None = None, cap_drafts: bool = True,
                 verify_mode: str | None = None, fullgraph: bool = True,
                 **options: Any) -> None:
        super().__init__()
        if isinstance(routers, str):
            routers = RouterSet.load(routers, model=model)
        routers.check_model(model)
        if "routers" in options or "stats" in options:
            raise TypeError("pass routers positionally; the speculative model keeps its own "
                            "stats (read .tide_stats, .spec_stats and .draft_stats)")
        if not isinstance(max_draft, int) or max_draft < 1:
            raise ValueError(f"max_draft must be an int >= 1, got {max_draft!r}")
        num_layers = routers.num_layers
        if max_draft_depth is None:
            max_draft_depth = num_layers - 1
        if not 1 <= max_draft_depth <= num_layers:
            raise ValueError(f"max_draft_depth must be in [1, {num_layers}] (layers), "
                             f"got {max_draft_depth}")
        options = {"strategy": "skip", **options}
        opts = parse_options({**options, "routers": routers})
        checkpoints = opts.checkpoints
        if not checkpoints:
            min_layers = opts.min_layers or routers.config.min_layers
            raise ValueError(
                f"no checkpoint at or after min_layers={min_layers}: drafts would be "
                "full-depth and speculative mode could not be faster; lower min_layers"
            )
        # The cap: a draft step never computes past the first checkpoint deeper than
        # max_draft_depth. A token still there exits by force (and ends the draft): the
        # verifier recomputes it at full depth anyway, so deeper draft layers are waste.
        self.draft_cap = next((c for c in checkpoints if c + 1 > max_draft_depth), None) \
            if cap_drafts else None
        self.draft_routers = routers if self.draft_cap is None else _forced_at(
            routers, self.draft_cap)
        self.model = model
        self.routers = routers
        self.max_draft = max_draft
        self.max_draft_depth = max_draft_depth
        self.num_layers = num_layers
        self.options = options
        self.draft_stats = ExitStats(num_layers=num_layers)
        self.spec_stats = SpeculativeStats(num_layers=num_layers)
        self.tide_stats = ExitStats(num_layers=num_layers)
        device = next(model.parameters()).device
        self._cuda = device.type == "cuda"
        if verify_mode is None and self._cuda and opts.inductor:
            verify_mode = "reduce-overhead"
        self.verify_mode = verify_mode
        # dynamic=False for both: they trace the same code object, and automatic dynamic
        # shapes would otherwise see [1, 1] (draft) then [1, W] (verify) and go dynamic.
        self.draft_forward = torch.compile(
            model.forward, backend="tide", fullgraph=fullgraph, dynamic=False,
            options={**options, "routers": self.draft_routers, "stats": self.draft_stats})
        self.verify_forward = torch.compile(
            model.forward, backend="inductor" if opts.inductor else "eager",
            mode=verify_mode, fullgraph=fullgraph, dynamic=False)
        self._cache: Any = None
        self._warned = False
        self._cache_key: tuple[int, torch.device | None] = (0, None)
        self._takes_cache_position = "cache_position" in inspect.signature(
            model.forward).parameters

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The plain model (speculation happens in :meth:`generate` only)."""
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ steps
    def _kwargs(self, ids: torch.Tensor, start: int, cache: Any) -> dict[str, Any]:
        width = ids.shape[1]
        positions = torch.arange(start, start + width, device=ids.device)
        kwargs = {"input_ids": ids, "position_ids": positions[None], "past_key_values": cache,
                  "use_cache": True}
        if self._takes_cache_position:
            kwargs["cache_position"] = positions
        return kwargs

    def _draft(self, token: torch.Tensor, pos: int, cache: Any) -> tuple[torch.Tensor, int]:
        """One draft step: last-position logits ``[vocab]`` and the layers it computed."""
        before = self.draft_stats.total_tokens
        logits = self.draft_forward(**self._kwargs(token, pos, cache)).logits[0, -1]
        exits = self.draft_stats.last_exit_layers
        if self.draft_stats.total_tokens == before or exits is None:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "the draft step ran without the tide runner (no exits recorded): Dynamo "
                    "probably hit its recompile limit on model.forward (each speculative "
                    "model adds two entries); output stays exact but drafts are full-depth",
                    RuntimeWarning, stacklevel=3)
            self.tide_stats.record_uniform(-1, 1, self.num_layers)
            return logits, self.num_layers
        c = int(exits.reshape(-1)[0])
        depth = self.num_layers if c < 0 else c + 1
        self.tide_stats.record_uniform(c, 1, depth, strategy=self.draft_stats.last_strategy)
        return logits, depth

    def _verify(self, ids: torch.Tensor, pos: int, cache: Any) -> torch.Tensor:
        if self._cuda:
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.verify_forward(**self._kwargs(ids, pos, cache)).logits[0]
        self.tide_stats.record_uniform(-1, 1, self.num_layers, strategy="verify")
        return logits.clone() if self._cuda else logits  # CUDA-graph outputs get overwritten

    def _get_cache(self, needed: int, device: torch.device) -> Any:
        from transformers import StaticCache

        # One cache reused across calls (reset): a new cache is new static graph inputs
        # and would recompile. Grown in steps of 128 positions when too short.
        cache = self._cache
        if cache is None or self._cache_key[0] < needed or self._cache_key[1] != device:
            length = -(-needed // 128) * 128
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            check_rollback(cache)
            self._cache, self._cache_key = cache, (length, device)
        else:
            cache.reset()
        return cache

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        *,
        attention_mask: torch.Tensor | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        **unsupported: Any,
    ) -> torch.Tensor:
        """Decode speculatively; returns ``[1, prompt + new]`` like ``model.generate``.

        Stops at EOS (from the arguments or ``model.generation_config``) or after
        ``max_new_tokens``. Sampling (``do_sample=True``) applies ``temperature``,
        ``top_k``, ``top_p`` (no defaults from ``generation_config``) and draws from
        ``generator``. ``pad_token_id`` is accepted for compatibility (batch 1 never pads).
        """
        if unsupported:
            raise TypeError(
                f"SpeculativeModel.generate does not support {sorted(unsupported)}; supported: "
                "max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p, "
                "eos_token_id, pad_token_id, generator"
            )
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"speculative mode decodes one sequence at a time (batch 1), got input_ids of "
                f"shape {tuple(input_ids.shape)}; loop over the rows, or use "
                "optimize(model, routers) (mode='exit') for batches"
            )
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("speculative mode takes unpadded input (batch 1): drop the padding")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        eos = set(eos_and_pad(self.model, eos_token_id, pad_token_id)[0])
        device = input_ids.device
        prompt_len = input_ids.shape[1]
        width = self.max_draft + 1
        cache = self._get_cache(prompt_len + max_new_tokens + width, device)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            """Next token (0-d) from logits ``[vocab]``; its probabilities when sampling."""
            if not do_sample:
                return logits.argmax(-1)
            probs = processed_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
            return torch.multinomial(probs, 1, generator=generator)[0]

        # Prefill: eager, so the cache is allocated (and its tensors marked static)
        # outside any compiled region; the verifier then recomputes nothing of it.
        out = self.model(**self._kwargs(input_ids, 0, cache))
        self.tide_stats.record_uniform(-1, prompt_len, prompt_len * self.num_layers,
                                       strategy="plain")
        first = int(pick(out.logits[0, -1]))
        new: list[int] = [first]
        last = torch.tensor([[first]], device=device)
        pos = prompt_len  # position of `last`, the latest token (not yet in the cache)
        stats = self.spec_stats
        while new[-1] not in eos and len(new) < max_new_tokens:
            budget = min(self.max_draft, max_new_tokens - len(new) - 1)
            drafts: list[torch.Tensor] = []
            draft_probs: list[torch.Tensor] = []
            draft_tops: list[torch.Tensor] = []  # exit top-1 per draft (regret, sampling)
            depths: list[int] = []
            token = last
            while len(drafts) < budget:
                logits, depth = self._draft(token, pos + len(drafts), cache)
                depths.append(depth)
                if do_sample:
                    q = processed_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
                    d = torch.multinomial(q, 1, generator=generator)[0]
                    draft_probs.append(q)
                    draft_tops.append(logits.argmax(-1))
                else:
                    d = logits.argmax(-1)
                drafts.append(d)
                token = d.reshape(1, 1)
                if depth > self.max_draft_depth:
                    break
            n = len(drafts)
            set_cache_length(cache, pos)  # the verify forward rewrites from `last` on
            window = torch.cat([last.reshape(1)] + [d.reshape(1) for d in drafts])
            if n + 1 < width:  # pad to the static width: rows past the prefix are scratch
                window = torch.cat([window, window[-1:].expand(width - n - 1)])
            logits = self._verify(window[None], pos, cache)
            verdict = verify_drafts(
                logits[:n + 1], window[1:n + 1], eos=eos, room=max_new_tokens - len(new),
                sampling=(dict(temperature=temperature, top_k=top_k, top_p=top_p)
                          if do_sample else None),
                draft_probs=torch.stack(draft_probs) if do_sample and n else None,
                exit_tops=torch.stack(draft_tops) if do_sample and n else None,
                generator=generator)
            k, emitted = verdict.accepted, verdict.emitted
            if n:
                self.tide_stats.record_regret(verdict.regrets, n)
            stats.record_round(depths, k, len(emitted))
            new.extend(emitted)
            # The cache now holds exact K/V for `last` and the k accepted drafts.
            pos += k + 1
            set_cache_length(cache, pos)
            last = torch.tensor([[new[-1]]], device=device)
        out_ids = torch.tensor([new], dtype=input_ids.dtype, device=device)
        return torch.cat([input_ids, out_ids], dim=-1)
