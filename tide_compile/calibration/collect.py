"""Collect residual-stream states at the checkpoint layers and after the last layer.

Forward hooks on the decoder layers read ``h_c`` for every checkpoint ``c`` and the final
state ``h_{L-1}`` (the final norm's input). ``output_hidden_states`` is not used: some
architectures (Falcon in transformers 5.2x) break with it, and it would keep every
layer's states alive. The hooks return None, so the layer outputs are untouched; the
hook on the last layer stops the forward pass once it has the final state, so the
lm_head (often the biggest matmul, over the whole vocabulary) never runs on the batch.

Memory is bounded: at most ``max_tokens`` token positions are kept (the same positions
at every checkpoint, a seeded random subset of all non-padding tokens), stored in the
model's dtype on ``storage_device``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model_probe import ModelProbe
from .data import TokenSamples

__all__ = ["CollectedStates", "collect_states"]


class _StopForward(Exception):
    """Raised by the last layer's hook: the rest of the forward pass is not needed."""


@dataclass
class CollectedStates:
    """Hidden states of the kept tokens.

    Attributes:
        states: checkpoint layer -> ``[n, hidden]`` states ``h_c`` (model dtype).
        final: ``[n, hidden]`` final-layer states ``h_{L-1}`` (before the final norm).
        sample_index: ``[n]`` which sample each kept token came from.
        position: ``[n]`` its position in the sample.
        total_tokens: non-padding tokens seen (kept or not).
    """

    states: dict[int, torch.Tensor]
    final: torch.Tensor
    sample_index: torch.Tensor
    position: torch.Tensor
    total_tokens: int

    @property
    def num_kept(self) -> int:
        return int(self.final.shape[0])


def _layer_output(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot read a hidden state from a decoder layer output of type {type(output).__name__}")


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


@torch.no_grad()
def collect_states(
    model: nn.Module,
    probe: ModelProbe,
    samples: TokenSamples,
    checkpoint_layers: list[int],
    *,
    max_tokens: int,
    batch_size: int = 8,
    seed: int = 0,
    storage_device: torch.device | str = "cpu",
    progress: bool = True,
) -> CollectedStates:
    """Run ``samples`` through ``model`` and keep the states of up to ``max_tokens`` tokens.

    Batches are formed from samples of similar length (right-padded, padding masked out)
    and run on the model's device in the model's dtype, with ``use_cache=False``.
    """
    from tqdm.auto import tqdm

    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_checkpoint must be at least 1, got {max_tokens}")
    device, dtype = _model_device_dtype(model)
    lengths = torch.tensor([len(x) for x in samples.input_ids], dtype=torch.int64)
    total = int(lengths.sum())
    num_keep = min(total, max_tokens)
    # Seeded choice of the kept tokens, as flat indices into the concatenated samples.
    gen = torch.Generator().manual_seed(seed)
    keep_flat = torch.zeros(total, dtype=torch.bool)
    keep_flat[torch.randperm(total, generator=gen)[:num_keep]] = True
    offsets = torch.cumsum(lengths, 0) - lengths
    # Output slot of each kept token, in (sample, position) order.
    slot_flat = torch.cumsum(keep_flat.to(torch.int64), 0) - 1

    hidden = probe.hidden_size
    last = probe.num_layers - 1
    watched = sorted(set(checkpoint_layers)) + [last]
    store = {c: torch.empty(num_keep, hidden, dtype=dtype, device=storage_device) for c in watched}
    sample_index = torch.empty(num_keep, dtype=torch.int64)
    position = torch.empty(num_keep, dtype=torch.int64)

    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    current: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module: nn.Module, args: object, output: object) -> None:
            h = _layer_output(output)
            rows, cols = current["rows"], current["cols"]
            store[layer][current["slots"]] = h[rows, cols].to(device=storage_device, dtype=dtype)
            if layer == last:
                raise _StopForward
            return None  # a forward hook that returns a value replaces the layer output

        return hook

    handles = [probe.layers[c].register_forward_hook(make_hook(c)) for c in watched]
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=total, desc="calibration: collecting states", unit="tok", disable=not progress)
        for batch in batches:
            width = int(lengths[batch].max())
            ids = torch.full((len(batch), width), samples.pad_token_id, dtype=torch.int64)
            mask = torch.zeros((len(batch), width), dtype=torch.int64)
            rows_l, cols_l, slots_l = [], [], []
            for r, i in enumerate(batch):
                n = int(lengths[i])
                ids[r, :n] = torch.tensor(samples.input_ids[i], dtype=torch.int64)
                mask[r, :n] = 1
                flat = slice(int(offsets[i]), int(offsets[i]) + n)
                pos = torch.nonzero(keep_flat[flat]).squeeze(1)
                rows_l.append(torch.full_like(pos, r))
                cols_l.append(pos)
                slots_l.append(slot_flat[flat][pos])
            rows, cols, slots = torch.cat(rows_l), torch.cat(cols_l), torch.cat(slots_l)
            sample_index[slots] = torch.tensor(batch, dtype=torch.int64)[rows]
            position[slots] = cols
            if rows.numel():
                current.update(rows=rows.to(device), cols=cols.to(device), slots=slots.to(storage_device))
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError(
                        f"the hook on the last decoder layer ({probe.layers_path}.{last}) never ran; "
                        "the model does not call its layers as tide_compile expects"
                    )
            bar.update(int(lengths[batch].sum()))
        bar.close()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return CollectedStates(
        states={c: store[c] for c in sorted(set(checkpoint_layers))},
        final=store[last],
        sample_index=sample_index,
        position=position,
        total_tokens=total,
    )
