"""``optimize(model, routers)``: a model whose forward and generate exit early.

``fast = tide_compile.optimize(model, routers, exit_threshold=0.85)`` compiles
``model.forward`` with the ``tide`` backend (same keyword options as
``torch.compile(..., backend="tide", options=...)``). ``fast.generate`` runs its own
static-cache decode loop (prefill, then one compiled step per token: HF's auto-compiled
static generate recompiles, a hand loop does not) and accepts the common ``generate``
arguments; ``fast.tide_stats`` counts exits over real tokens only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backend import parse_options
from ..reference import eos_and_pad, position_ids_from_mask, sample_next
from ..routers import RouterSet
from ..stats import ExitStats

__all__ = ["optimize", "TIDEModel"]


class TIDEModel(nn.Module):
    """A causal LM compiled with early exit. Calls go to the compiled forward.

    Attributes:
        model: the wrapped HF model (unchanged).
        routers: its routers.
        tide_stats: exits counted over real tokens (no padding, no finished rows) by
            :meth:`generate`, and over every position by direct calls.
    """

    def __init__(self, model: nn.Module, routers: RouterSet, options: dict[str, Any],
                 compile_kwargs: dict[str, Any]) -> None:
        super().__init__()
        routers.check_model(model)
        self.model = model
        self.routers = routers
        self._raw_stats = ExitStats(num_layers=routers.num_layers)
        self._caches: dict[tuple[int, int, torch.device], Any] = {}
        self.tide_stats = ExitStats(num_layers=routers.num_layers)
        opts = {**options, "routers": routers, "stats": self._raw_stats}
        parse_options(opts)
        self.options = options
        #: the prefill is compiled with a dynamic length, for the compact strategy
        self._compacts = options.get("strategy", "auto") in ("auto", "compact")
        self.compiled_forward = torch.compile(model.forward, backend="tide", options=opts,
                                              **compile_kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        before = self._raw_stats.total_tokens
        out = self.compiled_forward(*args, **kwargs)
        if self._raw_stats.total_tokens != before and self._raw_stats.last_exit_layers is not None:
            self.tide_stats.record(self._raw_stats.last_exit_layers,
                                   layers_executed=self._raw_stats.last_layers_executed)
        return out

    @property
    def config(self) -> Any:
        return self.model.config

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
        max_cache_len: int | None = None,
        **unsupported: Any,
    ) -> torch.Tensor:
        """Decode with early exit; returns ``[batch, prompt + new]`` like ``model.generate``.

        Left-padded batches take ``attention_mask``; rows stop at EOS (from the
        arguments or ``model.generation_config``) and are padded afterwards. The cache is
        a ``StaticCache`` of ``max_cache_len`` (default prompt + ``max_new_tokens``; pass
        one size for prompts of different lengths, as a new size is a new cache shape and
        compiles again). The prompt runs the compact strategy (unless ``strategy`` says
        otherwise), the decode steps the skip strategy.
        """
        from transformers import StaticCache

        if unsupported:
            raise TypeError(
                f"TIDEModel.generate does not support {sorted(unsupported)}; supported: "
                "max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p, "
                "eos_token_id, pad_token_id, generator, max_cache_len"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos, pad_token_id = eos_and_pad(self.model, eos_token_id, pad_token_id)
        batch, prompt_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache_len = max_cache_len or prompt_len + max_new_tokens
        if cache_len < prompt_len + max_new_tokens:
            raise ValueError(f"max_cache_len={cache_len} < prompt {prompt_len} + "
                             f"max_new_tokens {max_new_tokens}")
        # One cache per shape, reset between calls: a new cache would be new graph inputs
        # (Dynamo guards on the static addresses of cache tensors) and recompile.
        key = (batch, cache_len, input_ids.device)
        past = self._caches.get(key)
        if past is None:
            past = StaticCache(config=self.model.config, max_cache_len=cache_len)
            # Create the cache tensors now (one eager token): created inside a compiled
            # prefill they would be graph outputs, which compaction cannot gather.
            self.model(input_ids=input_ids[:, :1], past_key_values=past, use_cache=True)
            self._caches[key] = past
        past.reset()
        eos_t = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        positions = position_ids_from_mask(attention_mask)
        # The mask spans the whole cache (same shape every step, so no recompilation);
        # without padding there is none at all.
        padded = not bool(attention_mask.bool().all())
        mask = None
        if padded:
            mask = attention_mask.new_zeros(batch, cache_len)
            mask[:, :prompt_len] = attention_mask
        step_ids = input_ids
        sequences = input_ids
        written = prompt_len
        if self._compacts and prompt_len >= 2:
            # A dynamic-length prefill: the compact strategy needs the length symbolic,
            # and prompts of other lengths reuse the graph.
            step_ids = step_ids.clone()
            positions = positions.clone()
            torch._dynamo.mark_dynamic(step_ids, 1)
            torch._dynamo.mark_dynamic(positions, 1)
        for _ in range(max_new_tokens):
            out = self.compiled_forward(input_ids=step_ids, attention_mask=mask,
                                        position_ids=positions, past_key_values=past,
                                        use_cache=True)
            self._count(step_ids.shape[1], mask, unfinished, written)
            next_ids = sample_next(out.logits[:, -1, :], do_sample=do_sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator)
            next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad_token_id))
            sequences = torch.cat([sequences, next_ids[:, None]], dim=-1)
            if eos:
                unfinished = unfinished & ~torch.isin(next_ids, eos_t)
            if not bool(unfinished.any()):
                break
            if mask is not None:
                mask[:, written] = 1
            written += 1
            positions = positions[:, -1:] + 1
            # A fresh tensor: CUDA-graph outputs are overwritten by the next replay.
            step_ids = next_ids[:, None].clone()
        return sequences

    def _count(self, seq: int, mask: torch.Tensor | None, unfinished: torch.Tensor,
               written: int) -> None:
        """Count the step's real tokens: no padding, no rows that already stopped."""
        raw = self._raw_stats
        exits = raw.last_exit_layers
        if exits is None:
            return
        batch = unfinished.shape[0]
        executed = raw.last_layers_executed
        per_token = executed // max(1, exits.numel())
        if mask is None and batch == 1:
            # Nothing to drop (a stopped single row ends the loop): no device read.
            self.tide_stats.record(exits, layers_executed=executed)
            return
        keep = unfinished[:, None].expand(batch, seq)
        if mask is not None:
            keep = keep & mask[:, written - seq: written].bool()
        kept = exits.reshape(batch, seq).to(keep.device)[keep]
        self.tide_stats.record(kept, layers_executed=per_token * int(kept.numel()))


def optimize(model: nn.Module, routers: RouterSet | str, *, fullgraph: bool = True,
             dynamic: bool | None = None, mode: str = "exit", **options: Any) -> Any:
    """Compile ``model`` with early exit.

    Args:
        model: an HF causal LM (eval mode).
        routers: a RouterSet or a router file path (checked against the model).
        fullgraph, dynamic: passed to ``torch.compile``.
        mode: ``"exit"`` (a :class:`TIDEModel`: tokens exit early, outputs approximate)
            or ``"speculative"`` (a :class:`~.speculative.SpeculativeModel`: early-exit
            drafts verified at full depth, outputs those of the plain model; takes
            ``max_draft``, ``max_draft_depth``, ``verify_mode``; batch 1). Any other
            value is the backend's Inductor ``mode`` option (as before ``mode`` chose
            the decoding mode), in mode ``"exit"``.
        **options: the ``tide`` backend options (``exit_threshold``, ``min_layers``,
            ``strategy``, ``compaction_threshold``, ``compact_min_length``, ``stack_kv``,
            ``inductor``, ``inductor_config``, ``cuda_graphs``, ``kernels``; the Inductor
            mode as ``inductor_mode``). With ``strategy`` ``"auto"`` (default) or
            ``"compact"``, :meth:`TIDEModel.generate` compiles the prompt with a dynamic
            length, so every prompt length reuses one graph; it compacts (``auto``:
            prompts of at least ``compact_min_length`` tokens, 2048 by default).
    """
    if isinstance(routers, str):
        routers = RouterSet.load(routers, model=model)
    if "inductor_mode" in options:
        options["mode"] = options.pop("inductor_mode")
    if mode == "speculative":
        from .speculative import SpeculativeModel

        if dynamic:
            raise ValueError("mode='speculative' compiles static shapes; drop dynamic=True")
        return SpeculativeModel(model, routers, fullgraph=fullgraph, **options)
    if mode != "exit":
        options["mode"] = mode
    if "routers" in options or "stats" in options:
        raise TypeError("pass routers positionally; optimize() keeps its own stats "
                        "(read fast.tide_stats)")
    parse_options({**options, "routers": routers})
    return TIDEModel(model, routers, dict(options), {"fullgraph": fullgraph, "dynamic": dynamic})
