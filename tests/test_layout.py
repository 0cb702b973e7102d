import pytest
import torch

from fm_transformers.layout import csa_chunks_of_spans, csa_compress_rate, csa_layers
from fm_transformers.tiny import tiny_deepseek_v4


def compressed_entries(attention, hidden: torch.Tensor) -> torch.Tensor:
    """The CSA compressor's entries for `hidden` in one forward without a cache: (batch, entries, head_dim)."""
    q_residual = attention.q_a_norm(attention.q_a_proj(hidden))
    positions = torch.arange(hidden.shape[1]).unsqueeze(0)
    compressed, _ = attention.compressor(hidden, q_residual, positions, None, attention.layer_idx)
    return compressed[:, 0]


@pytest.mark.parametrize(
    "spans", [[(0, 1)], [(9, 10)], [(11, 12)], [(12, 13)], [(5, 14)], [(8, 16)], [(21, 27)], [(1, 2), (17, 19)]]
)
def test_spans_lie_in_exactly_the_chunks_the_csa_compressor_pools_them_into(spans):
    model = tiny_deepseek_v4()
    attention = model.model.layers[csa_layers(model.config)[0]].self_attn
    rate = csa_compress_rate(model.config)
    generator = torch.Generator().manual_seed(len(spans) * 100 + spans[0][0])
    hidden = torch.randn(1, 32, model.config.hidden_size, generator=generator)
    changed = hidden.clone()
    for start, stop in spans:
        changed[:, start:stop] += torch.randn(1, stop - start, model.config.hidden_size, generator=generator)
    with torch.no_grad():
        before, after = compressed_entries(attention, hidden), compressed_entries(attention, changed)
    moved = (before - after).abs().amax(dim=-1)[0] > 1e-6
    expected = [chunk for chunk in csa_chunks_of_spans(spans, rate) if chunk < before.shape[1]]
    assert moved.nonzero().flatten().tolist() == expected
