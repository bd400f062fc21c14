"""The compaction runner: prefill steps whose later layers run only the tokens that
continue (strategy ``compact``; ``auto`` picks it for dynamic-length StaticCache steps).

Per call, after each checkpoint until it compacts, the runner reads one number from the
device: how many positions still have a continuing token in some row (``m`` of the ``s``
the step holds). Then:

- ``m == 0``: every token exited: the KV-fill graph writes the skipped layers' K/V from
  the frozen states and the head reads the logits out (as the skip strategy);
- ``m / s < compaction_threshold`` and the bucket of ``m`` (the next power of two, at
  least 2) is below ``s``: compact. The KV-fill graph writes every token's K/V for the
  layers after the checkpoint from its frozen state; the kept positions (the continuing
  ones, padded to the bucket with exited ones, which compute exactly the frozen
  semantics) are gathered along the sequence from every value the later segments read;
  the compacted segments (:mod:`..passes.compact`) run the remaining layers on them,
  overwriting their K/V with the layers' own. The cache's write counters are put back to
  where a full step leaves them. The last layer's output and the exit state are
  scattered back to all ``s`` positions and the head runs on all of them.
- otherwise the next segment runs on all tokens (the frozen strategy).

With a ``frozen`` runner and ``min_length``, a step of fewer than ``min_length`` positions
runs that runner instead (strategy ``auto``: on short steps the split into segments and
the host reads cost more than compaction can save). It is the frozen strategy's runner
itself, compiled the same way, so a short step costs what ``strategy="frozen"`` costs.

At most one compaction per call; exits at later checkpoints inside the compacted set are
handled by the frozen semantics of the compacted segments. Compacted sizes are bucketed
to powers of two, so a step sees at most ``log2(s)`` distinct compacted shapes; graphs
are compiled once for the symbolic length (no recompilation per size).

Batch rows share the sequence positions (a StaticCache writes one position for every
row): a position is kept when any row's token there continues.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .runner import FrozenRunner, LazyGraph, RunnerArtifacts, SkipRunner, strip_exit_layer

__all__ = ["CompactRunner", "bucket"]


@dataclass
class _Compaction:
    """One step's compaction: kept offsets ``sel`` (``n`` of them) after checkpoint
    ``cut``; the write counters and their values before it; the exit state at ``cut``;
    the full values of everything gathered; the names the compacted segments produced."""

    sel: torch.Tensor
    n: int
    cut: int
    counters: list[torch.Tensor]
    saved: list[torch.Tensor]
    exit_layer: torch.Tensor
    frozen: torch.Tensor
    gathered: dict[str, torch.Tensor] = field(default_factory=dict)
    produced: set[str] = field(default_factory=set)


def bucket(m: int) -> int:
    """The compacted size for ``m`` kept positions: the next power of two, at least 2."""
    return max(2, 1 << (max(m, 1) - 1).bit_length())


class CompactRunner(SkipRunner):
    """Run a dynamic-length step, compacting the tokens that continue; see the module doc.

    Built from :class:`~.runner.RunnerArtifacts` with ``compact`` (the compacted
    segments; the split made with ``cut_before_head=True``), ``compaction_threshold``
    and ``compact_min_length`` (steps shorter than it run the frozen strategy's runner,
    built here from ``whole``). Every piece compiles once for the symbolic length.
    """

    strategy = "compact"

    def __init__(self, art: RunnerArtifacts) -> None:
        if art.compact is None:
            raise ValueError("the compaction runner needs the compacted segments (compact pass)")
        super().__init__(art)
        self.cuts = list(art.split.checkpoint_layers[:-1])  # the last cut is before the head
        self.plan = art.compact
        self.threshold = float(art.compaction_threshold)
        self.compacted = {k: LazyGraph(gm, art.compiler, f"compact{k}")
                          for k, gm in art.compact.segments.items()}
        self.min_length = int(art.compact_min_length)
        self.frozen = FrozenRunner(art) if self.min_length > 0 else None
        # Names of the exit state after each checkpoint, by kind (for the scatter back).
        self._exited_names = {names[0] for names in art.state_names.values()}
        self._frozen_names = {names[1] for names in art.state_names.values()}
        self._exit_layer_names = {names[2] for names in art.state_names.values()}
        #: tokens (positions) the layers after the compaction point ran on, last call;
        #: None when the call did not compact.
        self.last_compacted: tuple[int, int] | None = None
        #: whether the last call ran the frozen graph (a step shorter than min_length)
        self.last_frozen = False
        self.for_symbolic_sizes()

    def pieces(self) -> list[LazyGraph]:
        """Every lazily compiled piece (segments, compacted segments, KV-fills, head)."""
        return [*super().pieces(), *self.compacted.values()]

    def _seq_len(self, env: dict[str, Any]) -> int:
        return int(env[self.plan.seq_symbols[0]])

    def __call__(self, *args: Any) -> Any:
        env = self.split.env(*args, *self.extra)
        segs = self.split.segments
        self.last_compacted = None
        s = self._seq_len(env)
        self.last_frozen = self.frozen is not None and s < self.min_length
        if self.last_frozen:
            assert self.frozen is not None
            self.last_segments_run = 0
            return self.frozen(*args)  # records its own stats
        compact: _Compaction | None = None
        for k in range(len(segs) - 1):
            seg = segs[k]
            if compact is None:
                outs = self.segments[k](*[env[n] for n in seg.input_names])
            else:
                outs = self.compacted[k](*[compact.n if name in self.plan.seq_symbols
                                           else env[name] for name in seg.input_names],
                                         compact.sel)
                compact.produced.update(seg.output_names)
            env.update(zip(seg.output_names, outs))
            if k >= len(self.cuts) or compact is not None:
                continue
            c = self.cuts[k]
            exited_name, frozen_name, exit_layer_name = self.state_names[c]
            exited = env[exited_name]
            cont = ~exited.all(0) if exited.dim() > 1 else ~exited
            m = int(cont.sum())  # the one host sync per checkpoint
            if m == 0:
                self.last_segments_run = k + 1
                return self._exit_all(env, c, frozen_name, exit_layer_name)
            b = bucket(m)
            if b < s and m < self.threshold * s:
                compact = self._compact(env, k, c, cont, b, s)
        self.last_segments_run = len(segs)
        if compact is not None:
            env = self._scatter_back(env, compact, s)
        post = segs[-1]
        env.update(zip(post.output_names, self.segments[-1](*[env[n] for n in post.input_names])))
        outs, exit_layer = strip_exit_layer(self.split.outputs(env), self.user_outputs)
        if compact is None:
            depth_tokens = exit_layer.numel() * self.num_layers
        else:
            c = compact.cut
            rows = exit_layer.shape[0] if exit_layer.dim() > 1 else 1
            depth_tokens = rows * (s * (c + 1) + compact.n * (self.num_layers - c - 1))
        self.stats.record(exit_layer, layers_executed=depth_tokens, strategy=self.strategy)
        return outs

    def _compact(self, env: dict[str, Any], k: int, c: int, cont: torch.Tensor, b: int,
                 s: int) -> _Compaction:
        # Kept positions: continuing ones first, padded with exited ones, in step order.
        order = torch.argsort((~cont).to(torch.int8), stable=True)
        sel = order[:b].sort().values
        _, frozen_name, exit_layer_name = self.state_names[c]
        counters = [env[n] for n in self.plan.counters]
        saved = [t.clone() for t in counters]
        # Every token's K/V of the later layers from its frozen state; the compacted layers
        # overwrite the kept tokens'. The KV-fill must not advance the write counters.
        kv = self.kv_meta[c]
        env["h_frozen"] = env[frozen_name]
        kv_outs = self.kv_fills[c](*[env[n] for n in kv.input_names])
        if kv.output_positions and any(o is not None for o in kv_outs):
            raise RuntimeError("a compacted step's KV-fill returned graph outputs (a cache "
                               "created inside the graph); compaction needs an initialized "
                               "StaticCache")
        for t, v in zip(counters, saved):
            t.copy_(v)
        result = _Compaction(sel, b, c, counters, saved, env[exit_layer_name], env[frozen_name])
        needed = {n for j in range(k + 1, len(self.split.segments) - 1)
                  for n in self.split.segments[j].input_names}
        for name in needed:
            d = self.plan.seq_dims.get(name)
            v = env.get(name)
            if d is None or not isinstance(v, torch.Tensor):
                continue
            result.gathered[name] = v
            env[name] = v.index_select(d, sel.to(v.device))
        self.last_compacted = (b, s)
        return result

    def _scatter_back(self, env: dict[str, Any], compact: _Compaction, s: int) -> dict[str, Any]:
        sel, n = compact.sel, compact.n
        for t, v in zip(compact.counters, compact.saved):
            # The compacted layers advanced their counters by n; a full step advances by s.
            t.add_((t - v) // n * (s - n))
        post = self.split.segments[-1]
        out = dict(env)
        exit_layer_full = compact.exit_layer
        frozen_full = compact.frozen
        wanted = list(post.input_names) + [n for n in self.split.output_layout if n in env]
        for name in wanted:
            d = self.plan.seq_dims.get(name)
            v = env.get(name)
            if name not in compact.produced:
                if name in compact.gathered:
                    out[name] = compact.gathered[name]  # gathered, not recomputed
                continue
            if d is None or not isinstance(v, torch.Tensor):
                continue
            if name in self._exit_layer_names:
                base = exit_layer_full
            elif name in self._frozen_names:
                base = frozen_full
            elif name in self._exited_names:
                base = torch.ones(exit_layer_full.shape, dtype=v.dtype, device=v.device)
            else:
                shape = list(v.shape)
                shape[d] = s
                base = v.new_zeros(shape)
            out[name] = base.to(v.dtype).index_copy(d, sel.to(v.device), v)
        return out
