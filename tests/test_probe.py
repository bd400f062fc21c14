import pytest
import torch
from torch import nn

from tide_compile.model_probe import TESTED_ARCHITECTURES, probe
from tiny_models import ARCHS, make_model

EXPECTED_NORM = {
    "llama": "rms", "mistral": "rms", "qwen2": "rms", "qwen3": "rms", "phi3": "rms",
    "gemma": "gemma_rms",
    "gpt2": "layernorm", "gpt_neox": "layernorm", "opt": "layernorm", "falcon": "layernorm",
}


@pytest.mark.parametrize("arch", ARCHS)
def test_probe_finds_every_part(arch):
    model = make_model(arch, num_layers=3)
    p = probe(model)
    assert p.architecture in TESTED_ARCHITECTURES
    assert p.num_layers == 3 and len(p.layers) == 3
    assert p.hidden_size == 32
    assert p.vocab_size == 97
    assert p.norm_kind == EXPECTED_NORM[arch]
    assert p.lm_head is model.get_output_embeddings()
    assert p.embed_tokens is model.get_input_embeddings()
    assert model.get_submodule(p.layers_path) is p.layers
    assert model.get_submodule(p.final_norm_path) is p.final_norm


@pytest.mark.parametrize("arch", ARCHS)
def test_probe_head_matches_model_logits(arch):
    """probe.head applied to the last hidden state gives the model's own logits."""
    model = make_model(arch, num_layers=2)
    p = probe(model)
    ids = torch.randint(2, 97, (2, 5))
    with torch.no_grad():
        out = model(ids)
        captured = {}

        def hook(module, args, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output

        handle = p.layers[-1].register_forward_hook(hook)
        model(ids)
        handle.remove()
        logits = p.head(captured["h"])
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)


def test_probe_unknown_model_lists_missing_parts():
    class NotAnLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)

    with pytest.raises(ValueError) as err:
        probe(NotAnLM())
    msg = str(err.value)
    assert "decoder layers" in msg and "lm_head" in msg and "hidden size" in msg


def test_probe_reports_unrecognized_norm():
    model = make_model("llama", num_layers=2)

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(32))

        def forward(self, x):
            return 2.0 * x * self.weight

    model.model.norm = Scale()
    with pytest.raises(ValueError, match="final norm kind"):
        probe(model)
