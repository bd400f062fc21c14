"""``optimize(model, routers)``: a model whose forward and generate exit early.

``fast = tide_compile.optimize(model, routers, exit_threshold=0.85)`` compiles
``model.forward`` with the ``tide`` backend (same keyword options as
``torch.compile(..., backend="tide", options=...)``). ``fast.generate`` runs its own
static-cache decode loop and accepts the common ``generate`` arguments;
``fast.tide_stats`` counts exits over real tokens only, and the steps each strategy ran.

Shapes: every call of ``generate`` runs in a *bucket*: the batch rounded up to a power of
two and the cache length (prompt + new tokens) rounded up to a power of two of at least
:data:`MIN_CACHE_BUCKET` positions (or ``max_cache_len`` as given). Each bucket owns one
``StaticCache``, made at its first use and reused (reset) by every later call, and
compiles two graphs once: the prompt step (its length symbolic, so every prompt length
reuses it) and the one-token step (static sizes: the skip strategy, captured into CUDA
graphs on CUDA). Rows added to fill the batch bucket, and rows that have finished (EOS),
mirror a live row (its tokens, mask, positions and cache), so they exit when it exits and
never keep a step from skipping; their outputs are dropped and not counted.

Host time: a bucket's one-token steps read their inputs from buffers the bucket owns
(token ids, positions, the mask), written in place, so Dynamo hands the compiled runner
the same arguments every step. Once two steps through Dynamo have shown that, later
steps call the runner directly with those arguments (as gpt-fast and vLLM run their
decode loops): no guard evaluation and no input gathering per step. At batch 1 the
end-of-sequence check is read one step late (:class:`_LaggedFlag`; under
``kv="deferred"`` too), and a one-token
step's exits are counted from what the runner recorded on the host, so the only host
waits per step are the skip runner's flag reads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..options import DEFAULT_OPTIMIZE_KV, DEFERRED_DECODE, TideOptions, parse_options
from ..routers import RouterSet
from ..sampling import eos_and_pad, position_ids_from_mask, sample_next
from ..stats import ExitStats
from ..validation import check_generate_args

__all__ = ["optimize", "TIDEModel", "cache_bucket", "batch_bucket", "MIN_CACHE_BUCKET"]

#: The shortest cache ``generate`` allocates (positions); longer ones double.
MIN_CACHE_BUCKET = 256
#: Recompiles Dynamo may make beyond this model's buckets (its own default is 8).
_RECOMPILE_HEADROOM = 8


def _cache_entries(model: nn.Module) -> int:
    """How many Dynamo cache entries the model class's ``forward`` holds (what Dynamo
    compiles for ``torch.compile(model.forward)``: the outermost function, a decorator's
    wrapper in transformers); 0 where torch does not say."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        code = getattr(type(model).forward, "__code__", None)
        return len(_debug_get_cache_entry_list(code)) if code is not None else 0
    except Exception:  # a private helper: gone or changed in this torch
        return 0


def cache_bucket(positions: int) -> int:
    """The cache length for ``positions``: the next power of two, at least
    :data:`MIN_CACHE_BUCKET`."""
    return max(MIN_CACHE_BUCKET, 1 << max(positions - 1, 0).bit_length())


def batch_bucket(rows: int) -> int:
    """The rows the cache holds for a batch of ``rows``: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


@dataclass
class _Bucket:
    """One cache shape: its ``StaticCache``, the one-token step's input buffers (written in
    place: the compiled step sees the same tensors every call), which of its two graphs
    have run, and, once known, the runner to call directly for one-token steps."""

    cache: Any
    mask: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor
    compiled: set[str] = field(default_factory=set)
    direct: "_DirectStep | None" = None
    seen_args: tuple | None = None
    #: kv="deferred": the decode step's runner (its live input and force_deep flag)
    runner: Any = None
    #: kv="deferred": after a generate, the cache positions ``0 .. complete - 1``, whose
    #: K/V the steps that produced its tokens wrote at every layer (the rest, at most
    #: max_pending tokens, were left pending: nothing reads them). At batch 1 the step run
    #: after an EOS (the flag is read one step late, :class:`_LaggedFlag`) is not one of
    #: them: if it ran deep, the positions it completed are exact but not counted here.
    complete: int = 0
    #: kv="deferred": the decode step per width (:class:`.deferred.StepWidth`)
    widths: dict[int, Any] = field(default_factory=dict)


class _RecordingBackend:
    """The ``tide`` backend for one TIDEModel: compiles as ``backend="tide"`` does and
    wraps each graph's runner in a :class:`_Recorded`, which remembers its last call."""

    def __init__(self, options: TideOptions, deferred_decode: bool = False) -> None:
        self.options = options
        #: compile for the deferred decode loop (:data:`~..options.DEFERRED_DECODE`)
        self.deferred_decode = deferred_decode
        self.last: _Recorded | None = None

    def __call__(self, gm: Any, example_inputs: Any) -> "_Recorded":
        from torch._dynamo import lookup_backend  # the registered backend: no upward import

        token = DEFERRED_DECODE.set(self.deferred_decode)
        try:
            runner = lookup_backend("tide")(gm, example_inputs, options=self.options)
        finally:
            DEFERRED_DECODE.reset(token)
        return _Recorded(runner, self)


class _Recorded:
    """A compiled runner and the arguments and outputs of its last call."""

    def __init__(self, runner: Any, owner: _RecordingBackend) -> None:
        self.runner = runner
        self.owner = owner
        self.args: tuple = ()
        self.outs: Any = None

    def __call__(self, *args: Any) -> Any:
        self.owner.last = self
        self.args = args
        self.outs = self.runner(*args)
        return self.outs


@dataclass
class _DirectStep:
    """A one-token step called without Dynamo: ``runner(*args)``, logits at ``index`` of
    its outputs (None: the only output)."""

    runner: Any
    args: tuple
    index: int | None

    def __call__(self) -> torch.Tensor:
        outs = self.runner(*self.args)
        return outs if self.index is None else outs[self.index]


class TIDEModel(nn.Module):
    """A causal LM compiled with early exit. Calls go to the compiled forward.

    Attributes:
        model: the wrapped HF model (unchanged).
        routers: its routers.
        options: the backend options in force (:class:`~..options.TideOptions`).
        tide_stats: exits counted over real tokens (no padding, no finished rows) by
            :meth:`generate`, and over every position by direct calls; the steps each
            strategy ran (``steps_by_strategy``).
    """

    def __init__(self, model: nn.Module, options: TideOptions, *, fullgraph: bool = True,
                 dynamic: bool | None = None, target_agreement: float | None = None) -> None:
        super().__init__()
        routers = options.routers
        if routers is None:
            raise TypeError("TIDEModel needs options with routers (tide_compile.optimize)")
        routers.check_model(model)
        if options.kv == "deferred" and dynamic:
            raise ValueError("kv='deferred' compiles its decode step with static sizes; drop "
                             "dynamic=True")
        if target_agreement is not None and options.kv != "deferred":
            raise ValueError("target_agreement needs kv='deferred' (exit regret is measured "
                             "by the deep steps that run pending tokens' layers)")
        from .deferred import RegretController

        #: kv="deferred" with target_agreement: raises the threshold on measured regret
        self.controller = (RegretController(target_agreement) if target_agreement is not None
                           else None)
        self.model = model
        self.routers = routers
        if options.stats is None:
            options = options.replace(stats=ExitStats(num_layers=routers.num_layers))
        #: kv="deferred": the decode steps' threshold when set (:meth:`set_threshold`, the
        #: regret controller); None: the compiled one
        self.decode_threshold: float | None = None
        #: what the runners count: every position of every step
        self._raw_stats: ExitStats = options.stats
        self.options = options
        self.tide_stats = ExitStats(num_layers=routers.num_layers)
        self._buckets: dict[tuple[int, int, torch.device], _Bucket] = {}
        #: direct calls: torch.compile's shape handling as asked (None: automatic dynamic)
        self.compiled_forward = torch.compile(model.forward, backend="tide", options=options,
                                              fullgraph=fullgraph, dynamic=dynamic)
        # generate: static sizes per bucket unless dynamic=True (the prompt step's length
        # is marked dynamic by generate itself); its own backend object, so its graphs
        # are not shared with direct calls.
        self._generate_backend = _RecordingBackend(options)
        self._generate_forward = torch.compile(model.forward, backend=self._generate_backend,
                                               fullgraph=fullgraph,
                                               dynamic=False if dynamic is None else dynamic)
        # kv="deferred": the decode steps compile apart from the prompt step (another
        # backend object: Dynamo keeps each backend's graphs apart), static sizes.
        self._deferred_backend = _RecordingBackend(options, deferred_decode=True)
        self._deferred_forward = (torch.compile(model.forward, backend=self._deferred_backend,
                                                fullgraph=fullgraph, dynamic=False)
                                  if options.kv == "deferred" else None)
        #: mode="lossless": the lossless decoder (set by .lossless.build_lossless), which
        #: generate hands the decode to
        self.lossless: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        before = self._raw_stats.total_tokens
        out = self.compiled_forward(*args, **kwargs)
        raw = self._raw_stats
        if raw.total_tokens != before and raw.last_exit_layers is not None:
            self.tide_stats.record(raw.last_exit_layers, layers_executed=raw.last_layers_executed,
                                   strategy=raw.last_strategy)
        return out

    @property
    def config(self) -> Any:
        return self.model.config

    def set_threshold(self, threshold: float) -> None:
        """``kv="deferred"``: exit at ``threshold`` from the next decode step on, without
        compiling again (each decode runner shifts its copies of the router biases,
        :meth:`~.runner.SkipRunner.set_threshold`); strictly inside (0, 1). The prompt step
        keeps the compiled threshold."""
        if self.options.kv != "deferred":
            raise ValueError("set_threshold needs kv='deferred'; compile again "
                             "(optimize(..., exit_threshold=...)) under kv='propagate'")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"set_threshold takes a threshold strictly inside (0, 1), got "
                             f"{threshold!r}")
        self.decode_threshold = float(threshold)

    def cache_memory(self) -> dict[tuple[int, int, str], int]:
        """Bytes held by each bucket's cache: ``(rows, length, device) -> bytes``."""
        return {(rows, length, str(device)): _cache_bytes(b.cache)
                for (rows, length, device), b in self._buckets.items()}

    def release_caches(self) -> None:
        """Drop every bucket's cache (the next call of a bucket makes it again; its graphs
        stay compiled but Dynamo compiles again for the new cache tensors)."""
        self._buckets.clear()

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
        a ``StaticCache`` of the bucket (module docstring): ``max_cache_len`` positions if
        given, else prompt + ``max_new_tokens`` rounded up to a power of two of at least
        :data:`MIN_CACHE_BUCKET`; the batch rounded up to a power of two.
        """
        check_generate_args(self.model, input_ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
                            temperature=temperature, top_k=top_k, top_p=top_p)
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
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.lossless is not None:
            from .lossless import generate_lossless

            return generate_lossless(
                self, input_ids, max_new_tokens, attention_mask, eos,
                dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                     generator=generator), max_cache_len)
        if self.options.kv == "deferred":
            from .deferred import generate_deferred

            return generate_deferred(
                self, input_ids, max_new_tokens, attention_mask, eos, pad_token_id,
                dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                     generator=generator), max_cache_len, self.controller)
        needed = prompt_len + max_new_tokens
        cache_len = cache_bucket(needed) if max_cache_len is None else max_cache_len
        if cache_len < needed:
            raise ValueError(f"max_cache_len={cache_len} < prompt {prompt_len} + "
                             f"max_new_tokens {max_new_tokens}")
        bucket, index, positions = self._start(attention_mask, cache_len)
        rows = bucket.mask.shape[0]
        past, mask = bucket.cache, bucket.mask
        step_ids = input_ids[index]
        if prompt_len >= 2:
            # One prompt graph per bucket for every prompt length.
            torch._dynamo.mark_dynamic(step_ids, 1)
            torch._dynamo.mark_dynamic(positions, 1)
        else:  # a one-token prompt is a one-token step
            bucket.ids.copy_(step_ids)
            bucket.positions.copy_(positions)
            step_ids, positions = bucket.ids, bucket.positions
        eos_t = torch.tensor(eos, device=device, dtype=torch.long)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        live = [True] * batch
        # Batch 1: whether the last token was EOS is read one step late (_LaggedFlag), so
        # the host never waits for the GPU between two steps.
        lagged = _LaggedFlag(device) if batch == 1 and eos else None
        sequences = input_ids
        written = prompt_len
        for _ in range(max_new_tokens):
            seq = step_ids.shape[1]
            logits = self._step(bucket, step_ids, positions, seq > 1)
            if lagged is not None and lagged.done():
                break  # the previous token was EOS: this step's token is dropped, uncounted
            if seq > 1:
                self._count(batch, seq, mask, unfinished, written)
            else:
                self._count_decode(batch, live)
            next_ids = sample_next(logits[:, -1, :], do_sample=do_sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator)
            own = next_ids[:batch]
            own = torch.where(unfinished, own, torch.full_like(own, pad_token_id))
            sequences = torch.cat([sequences, own[:, None]], dim=-1)
            if eos:
                unfinished = unfinished & ~torch.isin(own, eos_t)
            mask[:, written] = 1
            written += 1
            if seq > 1:
                bucket.positions.copy_(positions[:, -1:] + 1)
                positions = bucket.positions
            else:
                positions.add_(1)
            if batch == 1:
                if lagged is not None:
                    lagged.record(unfinished)
            else:
                now = unfinished.tolist()  # the loop's one host read per step
                if not any(now):
                    break
                if any(live[i] and not now[i] for i in range(batch)):
                    # A row finished: it, and every row mirroring a finished one, mirror
                    # a live row from now on.
                    live = now
                    src = now.index(True)
                    dead = [i for i in range(rows) if i >= batch or not live[i]]
                    mirror_rows(past, mask, bucket.positions, dead, src)
                    source = [src if i in dead else i for i in range(rows)]
                    index = torch.tensor(source, device=device)
            # Mirroring rows take their source row's token.
            step_ids = bucket.ids
            step_ids.copy_(next_ids[index][:, None])
        return sequences

    def _start(self, attention_mask: torch.Tensor, cache_len: int
               ) -> tuple[_Bucket, torch.Tensor, torch.Tensor]:
        """A request's bucket, reset: ``(bucket, index, positions)``. ``index[r]`` is the
        request row that bucket row ``r`` holds (rows past the batch mirror row 0; finished
        rows later mirror a live row); the mask spans the whole cache (one shape for every
        step of the bucket) with the prompt's part written; ``positions`` are the prompt's
        position ids per bucket row."""
        batch, prompt_len = attention_mask.shape
        device = attention_mask.device
        rows = batch_bucket(batch)
        bucket = self._bucket(rows, cache_len, device)
        bucket.cache.reset()
        index = torch.tensor(list(range(batch)) + [0] * (rows - batch), device=device)
        bucket.mask.zero_()
        bucket.mask[:, :prompt_len] = attention_mask[index]
        return bucket, index, position_ids_from_mask(attention_mask)[index]

    def _step(self, bucket: _Bucket, ids: torch.Tensor, positions: torch.Tensor,
              prompt: bool, holder: Any = None) -> torch.Tensor:
        """One step's logits: directly through the bucket's runner once that is known
        safe (module docstring), else through Dynamo. ``holder``: where a decode step's
        direct call is kept (``direct``, ``seen_args``, ``kind``; default the bucket)."""
        holder = bucket if holder is None else holder
        if not prompt and holder.direct is not None:
            return holder.direct()
        deferred = not prompt and self._deferred_forward is not None
        forward = self._deferred_forward if deferred else self._generate_forward
        kind = "prompt" if prompt else getattr(holder, "kind", "step")
        with self._may_compile(bucket, kind):
            out = forward(input_ids=ids, attention_mask=bucket.mask, position_ids=positions,
                          past_key_values=bucket.cache, use_cache=True)
        recorded = (self._deferred_backend if deferred else self._generate_backend).last
        if not prompt and recorded is not None:
            # Direct calls once two Dynamo calls handed the runner the same arguments,
            # and its output is the logits tensor itself.
            args = recorded.args
            same = holder.seen_args is not None and len(args) == len(holder.seen_args) and all(
                a is b or (not isinstance(a, torch.Tensor) and a == b)
                for a, b in zip(args, holder.seen_args))
            holder.seen_args = args
            outs = recorded.outs
            index = (None if outs is out.logits else next(
                (i for i, o in enumerate(outs) if o is out.logits), -1)
                if isinstance(outs, (tuple, list)) else -1)
            if same and index != -1:
                holder.direct = _DirectStep(recorded.runner, args, index)
        return out.logits

    def _bucket(self, rows: int, cache_len: int, device: torch.device) -> _Bucket:
        """The bucket's cache and input buffers, made at its first use."""
        from transformers import StaticCache

        key = (rows, cache_len, device)
        bucket = self._buckets.get(key)
        if bucket is None:
            cache = StaticCache(config=self.model.config, max_cache_len=cache_len)
            width = self.options.max_pending + 1 if self.options.kv == "deferred" else 1
            # Create the cache tensors now (one eager token): created inside a compiled
            # prompt step they would be graph outputs, which compaction cannot gather.
            self.model(input_ids=torch.zeros(rows, 1, dtype=torch.long, device=device),
                       past_key_values=cache, use_cache=True)
            bucket = self._buckets[key] = _Bucket(
                cache, mask=torch.zeros(rows, cache_len, dtype=torch.long, device=device),
                ids=torch.zeros(rows, width, dtype=torch.long, device=device),
                positions=torch.zeros(rows, width, dtype=torch.long, device=device))
        return bucket

    def _may_compile(self, bucket: _Bucket, kind: str) -> contextlib.AbstractContextManager:
        """Around the first call of each graph of a bucket (the prompt step, the decode
        step, or one per width under kv="deferred"): Dynamo's recompile limit raised to
        cover every graph of every bucket (each bucket is new cache tensors and new static
        sizes, so a new graph), or the cache entries that the model's forward already
        holds, where more (they include this model's own graphs). Dynamo counts entries
        per code object, and every compiled forward of one model class shares it: other
        TIDEModels of the same class, the caller's own ``torch.compile`` of it. Without
        counting those, the fifth lossless model of one class failed with "recompile
        limit exceeded"."""
        if kind in bucket.compiled:
            return contextlib.nullcontext()
        bucket.compiled.add(kind)
        graphs = sum(max(2, len(b.compiled)) for b in self._buckets.values())
        limit = max(torch._dynamo.config.recompile_limit,
                    _RECOMPILE_HEADROOM + max(graphs, _cache_entries(self.model)))
        return torch._dynamo.config.patch(recompile_limit=limit)

    def _count_decode(self, batch: int, live: list[bool]) -> None:
        """Count a one-token step of :meth:`generate`: its real tokens are the ``live``
        rows (the host's copy of ``unfinished``; a decode position is never padding), so
        nothing is read from the device when the runner counted on the host."""
        raw = self._raw_stats
        exits = raw.last_exit_layers
        if exits is None:
            return
        per_token = raw.last_layers_executed // max(1, exits.numel())
        if batch == 1 and exits.device.type == "cpu":
            self.tide_stats.record_uniform(int(exits.reshape(-1)[0]), 1, per_token,
                                           strategy=raw.last_strategy)
            return
        kept = exits.reshape(-1)[:batch]
        if not all(live):
            kept = kept[torch.tensor([i for i in range(batch) if live[i]], device=kept.device)]
        self.tide_stats.record(kept, layers_executed=per_token * int(kept.numel()),
                               strategy=raw.last_strategy)

    def _count(self, batch: int, seq: int, mask: torch.Tensor, unfinished: torch.Tensor,
               written: int) -> None:
        """Count the step's real tokens: no padding, no mirroring rows, no finished rows."""
        raw = self._raw_stats
        exits = raw.last_exit_layers
        if exits is None:
            return
        rows = mask.shape[0]
        per_token = raw.last_layers_executed // max(1, exits.numel())
        keep = unfinished[:, None] & mask[:batch, written - seq: written].bool()
        kept = exits.reshape(rows, seq)[:batch].to(keep.device)[keep]
        self.tide_stats.record(kept, layers_executed=per_token * int(kept.numel()),
                               strategy=raw.last_strategy)


class _LaggedFlag:
    """``generate``'s end-of-sequence check at batch 1, read one step late (the decode
    loops of :meth:`TIDEModel.generate`, ``kv="deferred"``'s
    :func:`~.deferred.generate_deferred` and the lossless decoder's drafts).

    Reading ``unfinished`` right after a step would make the host wait for the GPU to
    finish it, and the GPU then waits while the host prepares the next step. Instead the
    flag is copied into pinned host memory behind an event, the next step is launched,
    and the flag is read after it (by then the event has passed, or passes before the
    next step's own work). A row that ended runs one more step, whose token is dropped
    and not counted. On the CPU the flag is read at once (no queue to keep full), but
    the loop still checks it only after the next step, as on the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host = torch.ones((), dtype=torch.bool, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.armed = False

    def record(self, unfinished: torch.Tensor) -> None:
        """Keep whether any element of ``unfinished`` (a bool tensor) is set."""
        if self.cuda:
            flag = unfinished.reshape(()) if unfinished.numel() == 1 else unfinished.any()
            self.host.copy_(flag, non_blocking=True)
            self.event.record()
        else:
            self.host.fill_(bool(unfinished.any()))
        self.armed = True

    def done(self) -> bool:
        """The row ended at the last recorded step."""
        if not self.armed:
            return False
        if self.event is not None:
            self.event.synchronize()
        return not bool(self.host)


def mirror_rows(cache: Any, mask: torch.Tensor, positions: torch.Tensor, rows: list[int],
                 src: int) -> None:
    """Make ``rows`` copies of row ``src``: every cache tensor with a batch dimension, the
    mask and the positions, in place (compiled graphs hold their addresses)."""
    dst = torch.tensor(rows, device=mask.device)

    def copy(t: torch.Tensor) -> None:  # the source row cloned: it is a view of t
        t.index_copy_(0, dst.to(t.device), t[src:src + 1].clone().expand(len(rows), *t.shape[1:]))

    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == mask.shape[0]:
                copy(t)
    copy(mask)
    copy(positions)


def _cache_bytes(cache: Any) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def optimize(model: nn.Module, routers: RouterSet | str, *, fullgraph: bool = True,
             dynamic: bool | None = None, mode: str = "exit",
             target_agreement: float | None = None, **options: Any) -> Any:
    """Compile ``model`` with early exit.

    Args:
        model: an HF causal LM (eval mode).
        routers: a RouterSet or a router file path (checked against the model).
        fullgraph, dynamic: passed to ``torch.compile`` for direct calls (``fast(...)``);
            ``generate`` compiles static sizes per bucket unless ``dynamic=True`` (see
            :class:`TIDEModel`).
        mode: the decoding mode: ``"exit"`` (a :class:`TIDEModel`: tokens exit early,
            outputs approximate), ``"lossless"`` (a :class:`TIDEModel` on
            ``kv="deferred"`` whose ``generate`` verifies the exited tokens' drafts in
            the deep steps, outputs those of the plain model, :mod:`.lossless`; takes
            ``adaptive``; batch 1). ``"speculative"`` (drafts verified by a separate
            full-depth forward) was removed: ``"lossless"`` gives the same output and
            measured faster on every row (docs/lossless.md); it raises a ``ValueError``.
        **options: the ``tide`` backend options (``exit_threshold``, ``min_layers``,
            ``strategy``, ``compaction_threshold``, ``compact_min_length``, ``stack_kv``,
            ``inductor``, ``inductor_config``, ``cuda_graphs``, ``kernels``), with the
            Inductor mode as ``inductor_mode``, and ``kv`` / ``max_pending``: the K/V
            semantics. ``optimize`` defaults to ``kv="deferred"`` (exact K/V: ``generate``
            runs an exited token's skipped layers later, batched; docs/deferred.md), where
            the backend used directly defaults to ``"propagate"`` (only ``generate``'s loop
            can defer). Under ``"deferred"`` a direct call ``fast(...)`` runs every layer;
            pass ``kv="propagate"`` for skipping in your own loop or for long prompts
            (compaction).
        target_agreement: ``kv="deferred"`` only: turn on the
            :class:`~.deferred.RegretController`, which raises the exit threshold while
            the measured exit regret exceeds ``1 - target_agreement`` (off by default).
    """
    if mode == "speculative":
        raise ValueError("mode='speculative' was replaced by mode='lossless' (the same "
                         "output, faster on every measured row: docs/lossless.md); use "
                         "optimize(model, routers, mode='lossless')")
    if mode not in ("exit", "lossless"):
        raise ValueError(f"mode must be 'exit' or 'lossless' (the decoding mode), got "
                         f"{mode!r}; pass an Inductor mode as inductor_mode={mode!r}")
    if "mode" in options:
        raise TypeError("the Inductor mode is optimize(..., inductor_mode=...)")
    if "inductor_mode" in options:
        options["mode"] = options.pop("inductor_mode")
    if isinstance(routers, str):
        routers = RouterSet.load(routers)
    if mode == "lossless":
        from .lossless import build_lossless

        if target_agreement is not None:
            raise ValueError("target_agreement is a kv='deferred' option of mode='exit' "
                             "(mode='lossless' output does not depend on the threshold)")
        return build_lossless(model, routers, fullgraph=fullgraph, dynamic=dynamic, **options)
    if "routers" in options or "stats" in options:
        raise TypeError("pass routers positionally; optimize() keeps its own stats "
                        "(read fast.tide_stats)")
    if isinstance(routers, RouterSet):
        options["stats"] = ExitStats(num_layers=routers.num_layers)
    options.setdefault("kv", DEFAULT_OPTIMIZE_KV)
    return TIDEModel(model, parse_options({**options, "routers": routers}),
                     fullgraph=fullgraph, dynamic=dynamic, target_agreement=target_agreement)
