"""Find the parts of a HuggingFace causal LM that early exit needs (eager side).

`probe(model)` returns a :class:`ModelProbe`: the decoder layers, the final norm and its
kind, the output head, the token embeddings, hidden size and layer count. One generic
probe covers the architectures this project tests (Llama, Mistral, Qwen2, Qwen3, Gemma,
GPT-2, GPT-NeoX, Phi-3, OPT, Falcon); any other model gets the same attempt and, where
a part cannot be found, an error that lists what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

__all__ = ["ModelProbe", "NormKind", "probe", "TESTED_ARCHITECTURES"]

NormKind = Literal["rms", "gemma_rms", "layernorm"]

#: Model classes the test suite probes (tiny random configs).
TESTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "Phi3ForCausalLM",
    "OPTForCausalLM",
    "FalconForCausalLM",
)

# Attribute names of the final norm across HF decoders, most common first.
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f", "ln_out")
_HIDDEN_SIZE_NAMES = ("hidden_size", "n_embd", "d_model")
_NUM_LAYERS_NAMES = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class ModelProbe:
    """The parts of a causal LM that early exit reads.

    Attributes:
        model: the probed model.
        architecture: the model's class name (also stored in router files).
        layers: the decoder layers, in order.
        layers_path: dotted path of ``layers`` inside ``model`` (e.g. ``model.layers``).
        final_norm: the norm applied after the last layer.
        final_norm_path: its dotted path.
        norm_kind: ``"rms"``, ``"gemma_rms"`` (scale ``1 + w``) or ``"layernorm"``,
            established numerically from the module's own output.
        lm_head: the output projection to the vocabulary.
        embed_tokens: the token embedding.
        project_out: an extra projection between final norm and lm_head (OPT with
            ``word_embed_proj_dim != hidden_size``), else None.
        hidden_size: width of the residual stream.
        num_layers: number of decoder layers.
    """

    model: nn.Module
    architecture: str
    layers: nn.ModuleList
    layers_path: str
    final_norm: nn.Module
    final_norm_path: str
    norm_kind: NormKind
    lm_head: nn.Module
    embed_tokens: nn.Module
    project_out: nn.Module | None
    hidden_size: int
    num_layers: int
    vocab_size: int = field(default=0)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from a residual-stream state: ``lm_head(final_norm(hidden))``."""
        x = self.final_norm(hidden)
        if self.project_out is not None:
            x = self.project_out(x)
        return self.lm_head(x)


def _config_int(config: object, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _find_layers(model: nn.Module, num_layers: int | None) -> tuple[str, nn.ModuleList] | None:
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) > 0
        and (num_layers is None or len(mod) == num_layers)
        and len({type(m) for m in mod}) == 1
    ]
    if not candidates:
        return None
    # The decoder stack holds most of the parameters.
    return max(candidates, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _find_final_norm(model: nn.Module, layers_path: str) -> tuple[str, nn.Module] | None:
    parent_path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    for name in _FINAL_NORM_NAMES:
        mod = getattr(parent, name, None)
        if isinstance(mod, nn.Module):
            return (f"{parent_path}.{name}" if parent_path else name), mod
    return None


def _norm_eps(norm: nn.Module) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    return 1e-5


@torch.no_grad()
def _classify_norm(norm: nn.Module, hidden_size: int) -> NormKind | None:
    """Which formula the norm computes, decided from its output on random input."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (hidden_size,):
        return None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, hidden_size, generator=gen) * 3.0 + 0.5
    x = x.to(device=weight.device, dtype=weight.dtype)
    y = norm(x).float()
    xf, w = x.float(), weight.float()
    eps = _norm_eps(norm)
    rms = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    centered = xf - xf.mean(-1, keepdim=True)
    ln = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps)
    bias = getattr(norm, "bias", None)
    ln = ln * w + (bias.float() if isinstance(bias, torch.Tensor) else 0.0)
    tol = 1e-3 if weight.dtype == torch.float32 else 3e-2
    candidates: list[tuple[NormKind, torch.Tensor]] = [
        ("rms", rms * w),
        ("gemma_rms", rms * (1.0 + w)),
        ("layernorm", ln),
    ]
    for kind, expected in candidates:
        if torch.allclose(y, expected, rtol=tol, atol=tol):
            return kind
    return None


def probe(model: nn.Module) -> ModelProbe:
    """Locate layers, final norm, lm_head and embeddings of an HF causal LM.

    Raises:
        ValueError: listing every part that could not be found.
    """
    config = getattr(model, "config", None)
    hidden_size = _config_int(config, _HIDDEN_SIZE_NAMES)
    num_layers = _config_int(config, _NUM_LAYERS_NAMES)
    missing: list[str] = []

    found_layers = _find_layers(model, num_layers)
    if found_layers is None:
        missing.append(
            "decoder layers (an nn.ModuleList of identical blocks"
            + (f" with config's {num_layers} entries)" if num_layers else ")")
        )
    found_norm = _find_final_norm(model, found_layers[0]) if found_layers else None
    if found_layers is not None and found_norm is None:
        missing.append(f"final norm (one of {', '.join(_FINAL_NORM_NAMES)} beside the layers)")
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(lm_head, nn.Module):
        missing.append("lm_head (model.get_output_embeddings() returned nothing)")
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embed, nn.Module):
        missing.append("token embeddings (model.get_input_embeddings() returned nothing)")
    if hidden_size is None:
        missing.append(f"hidden size (config has none of {', '.join(_HIDDEN_SIZE_NAMES)})")
    norm_kind: NormKind | None = None
    if found_norm is not None and hidden_size is not None:
        norm_kind = _classify_norm(found_norm[1], hidden_size)
        if norm_kind is None:
            missing.append(
                f"final norm kind ({type(found_norm[1]).__name__} at {found_norm[0]} computes "
                "neither RMSNorm, Gemma-style RMSNorm (1 + w) nor LayerNorm)"
            )
    if missing:
        raise ValueError(
            f"tide_compile cannot probe {type(model).__name__}: not found: "
            + "; ".join(missing)
            + f". Tested architectures: {', '.join(TESTED_ARCHITECTURES)}."
        )
    assert found_layers is not None and found_norm is not None and norm_kind is not None
    assert hidden_size is not None and isinstance(lm_head, nn.Module) and embed is not None
    layers_path, layers = found_layers
    parent_path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    project_out = getattr(parent, "project_out", None)
    vocab = getattr(lm_head, "out_features", None) or _config_int(config, ("vocab_size",)) or 0
    return ModelProbe(
        model=model,
        architecture=type(model).__name__,
        layers=layers,
        layers_path=layers_path,
        final_norm=found_norm[1],
        final_norm_path=found_norm[0],
        norm_kind=norm_kind,
        lm_head=lm_head,
        embed_tokens=embed,
        project_out=project_out if isinstance(project_out, nn.Module) else None,
        hidden_size=hidden_size,
        num_layers=len(layers),
        vocab_size=int(vocab),
    )
