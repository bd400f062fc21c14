"""Tiny random-weight configs of every architecture the probe covers (no downloads)."""

from __future__ import annotations

import torch
import transformers as T

# hidden 32, 4 heads (head_dim 8), 2 KV heads where the architecture has GQA.
_COMMON = dict(vocab_size=97, max_position_embeddings=128)


def make_config(arch: str, num_layers: int = 4) -> T.PretrainedConfig:
    if arch == "llama":
        return T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2, **_COMMON)
    if arch == "mistral":
        return T.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                               **_COMMON)
    if arch == "qwen2":
        return T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2, **_COMMON)
    if arch == "qwen3":
        return T.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, **_COMMON)
    if arch == "gemma":
        return T.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, **_COMMON)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=32, n_layer=num_layers, n_head=4, vocab_size=97, n_positions=128,
                            bos_token_id=0, eos_token_id=1)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                               num_attention_heads=4, bos_token_id=0, eos_token_id=1, **_COMMON)
    if arch == "phi3":
        return T.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                            bos_token_id=0, eos_token_id=1, **_COMMON)
    if arch == "opt":
        return T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=num_layers,
                           num_attention_heads=4, word_embed_proj_dim=32, pad_token_id=0,
                           bos_token_id=0, eos_token_id=1, **_COMMON)
    if arch == "falcon":
        return T.FalconConfig(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                              vocab_size=97, bos_token_id=0, eos_token_id=1)
    raise KeyError(arch)


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "gpt_neox", "phi3", "opt", "falcon")


def make_model(arch: str, num_layers: int = 4, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(make_config(arch, num_layers), dtype=dtype)
    # Randomize norm weights too (HF inits them to 1 or 0), so the probe and exits see
    # realistic, non-trivial norms.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2:][0]:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
