"""The memory indexer's scores follow REFERENCE.md section 2; selection is threshold + union + tail + sink."""

import pytest
import torch

import fm_transformers as fm
from fm_transformers.config import LSAConfig
from fm_transformers.policies import SelectionContext, resident_sets


def interleaved_rope(x, positions, inv_freq):
    """RoPE on the trailing 2 * len(inv_freq) channels, rotating consecutive pairs (V4's layout)."""
    rope_dim = 2 * inv_freq.numel()
    angles = positions[..., None].float() * inv_freq  # (..., rope_dim / 2)
    cos, sin = angles.cos()[..., None, :], angles.sin()[..., None, :]  # broadcast over heads
    head = x[..., -rope_dim:]
    even, odd = head[..., 0::2], head[..., 1::2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([x[..., :-rope_dim], rotated], dim=-1)


def test_scores_equal_the_formula_on_random_inputs(model):
    indexer = fm.MemoryIndexerModel.from_backbone(model, layers=[2, 6], num_heads=5, rank=12)
    layer = indexer.indexers["6"]
    hidden, keys = torch.randn(3, 2, 64), torch.randn(3, 11, 16)
    positions = torch.tensor([[40, 41], [7, 8], [100, 101]])
    q = layer.up_proj(layer.q_norm.weight * torch.nn.functional.rms_norm(layer.down_proj(hidden), (12,), eps=1e-6))
    q = interleaved_rope(q.view(3, 2, 5, 16), positions, indexer.rotary_emb.compress_inv_freq)
    w = layer.weights_proj(hidden) * 16**-0.5 * 5**-0.5
    expected = torch.sigmoid((w[..., None] * torch.relu(torch.einsum("bshd,btd->bsht", q, keys))).sum(2))
    torch.testing.assert_close(indexer.scores(6, hidden, positions, keys), expected, rtol=1e-5, atol=1e-6)


def test_policy_keeps_chunks_over_threshold_in_any_layer(model):
    indexer = fm.MemoryIndexerModel.from_backbone(model, layers=[2, 4], num_heads=4, rank=8)
    policy = fm.MemoryIndexerPolicy(indexer, threshold=0.5)
    hidden, keys_a, keys_b = torch.randn(2, 64), torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    positions = torch.tensor([60, 60])
    policy.observe(2, hidden, positions, keys_a)
    policy.observe(4, hidden, positions, keys_b)
    context = SelectionContext(num_chunks=9, visible=torch.tensor([9, 9]), trigger_index=0, device=torch.device("cpu"))
    priorities = policy.priorities(context)
    union = torch.maximum(indexer.scores(2, hidden[:, None], positions[:, None], keys_a), indexer.scores(4, hidden[:, None], positions[:, None], keys_b))[:, 0]
    assert torch.equal(torch.isfinite(priorities), union >= 0.5)
    assert 0 < int(torch.isfinite(priorities).sum()) < 18  # the random indexer keeps some, not all


def test_policy_never_selects_chunks_the_token_cannot_see(model):
    indexer = fm.MemoryIndexerModel.from_backbone(model, layers=[2], num_heads=4, rank=8)
    policy = fm.MemoryIndexerPolicy(indexer, threshold=0.0)
    policy.observe(2, torch.randn(1, 64), torch.tensor([22]), torch.randn(1, 9, 16))  # sees chunks 0..4
    context = SelectionContext(num_chunks=9, visible=torch.tensor([5]), trigger_index=0, device=torch.device("cpu"))
    assert torch.isfinite(policy.priorities(context))[0].tolist() == [True] * 5 + [False] * 4


def context_for(num_chunks, batch=1):
    return SelectionContext(num_chunks=num_chunks, visible=torch.full((batch,), num_chunks), trigger_index=0, device=torch.device("cpu"))


def test_recency_tail_and_sink_are_always_resident():
    context = context_for(20)
    nothing_wanted = torch.full((1, 20), float("-inf"))
    (ids,) = resident_sets(nothing_wanted, context, LSAConfig(recency_chunks=3, sink_chunks=2))
    assert ids.tolist() == [0, 1, 17, 18, 19]


def test_budget_keeps_highest_priorities_and_never_drops_tail_or_sink():
    context = context_for(20)
    priorities = torch.arange(20, dtype=torch.float32).flip(0).unsqueeze(0)  # chunk 0 highest
    (ids,) = resident_sets(priorities, context, LSAConfig(recency_chunks=2, sink_chunks=1, resident_budget=6))
    assert ids.tolist() == [0, 1, 2, 3, 18, 19]
    (ids,) = resident_sets(priorities, context, LSAConfig(recency_chunks=4, sink_chunks=2, resident_budget=3))
    assert ids.tolist() == [0, 1, 16, 17, 18, 19]


def test_fractional_budget_scales_with_history():
    priorities = torch.zeros(1, 40)
    (ids,) = resident_sets(priorities, context_for(40), LSAConfig(recency_chunks=0, sink_chunks=0, resident_budget=0.25))
    assert ids.numel() == 10


def _resident_sets_one_sequence_at_a_time(priorities, num_chunks, config):
    """The selection written plainly, sequence by sequence: the reference of the batched one."""
    ids = torch.arange(num_chunks)
    forced = (ids >= num_chunks - config.recency_chunks) | (ids < config.sink_chunks)
    budget = config.budget_chunks(num_chunks)
    sets = []
    for row in priorities:
        chosen = [int(i) for i in ids[torch.isfinite(row) & ~forced]]
        if budget is not None:
            room = max(0, budget - int(forced.sum()))
            chosen = sorted(chosen, key=lambda i: (-float(row[i]), i))[:room]
        sets.append(sorted(chosen + [int(i) for i in ids[forced]]))
    return sets


@pytest.mark.parametrize("budget", [None, 1, 5, 12, 0.3, 1.0])
@pytest.mark.parametrize("recency,sink", [(0, 0), (3, 2), (30, 30)])
def test_batched_selection_equals_the_selection_of_each_sequence(budget, recency, sink):
    generator = torch.Generator().manual_seed(0)
    num_chunks, batch = 40, 4
    priorities = torch.randint(0, 6, (batch, num_chunks), generator=generator).float()  # many ties
    priorities[torch.rand(batch, num_chunks, generator=generator) < 0.4] = float("-inf")
    priorities[2] = float("-inf")  # a sequence that wants nothing
    config = LSAConfig(recency_chunks=recency, sink_chunks=sink, resident_budget=budget)
    got = resident_sets(priorities, context_for(num_chunks, batch), config)
    assert [ids.tolist() for ids in got] == _resident_sets_one_sequence_at_a_time(priorities, num_chunks, config)


@pytest.mark.parametrize("extra_heads", [0, 4])
def test_an_indexer_started_from_the_native_one_scores_a_token_as_the_native_indexer_does(extra_heads):
    """from_native copies each target layer's native query tower: on a real forward its logits for every token
    equal the native indexer's scores against the same compressed index keys (extra heads add nothing yet)."""
    from fm_transformers.tiny import tiny_deepseek_v4

    backbone = tiny_deepseek_v4(seed=1)
    layer = 6
    attention = backbone.model.layers[layer].self_attn
    seen = {}
    native = attention.compressor.indexer
    native.register_forward_pre_hook(lambda module, args: seen.update(hidden=args[0], positions=args[2]))
    native.scorer.register_forward_hook(lambda module, args, output: seen.update(keys=args[1], native=output))
    prompt = torch.randint(3, backbone.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        backbone(prompt, use_cache=False)
    heads = backbone.config.index_n_heads + extra_heads
    indexer = fm.MemoryIndexerModel.from_native(backbone, layers=[2, layer], num_heads=heads)
    assert indexer.config.num_heads == heads and indexer.config.rank == backbone.config.q_lora_rank
    with torch.no_grad():
        logits = indexer(layer, seen["hidden"], seen["positions"], seen["keys"])
    assert seen["native"].abs().max() > 0.1  # real scores, not an all-zero tie
    torch.testing.assert_close(logits, seen["native"].float(), rtol=1e-4, atol=1e-5)


def test_a_native_start_with_fewer_heads_than_the_native_indexer_is_a_clear_error(model):
    with pytest.raises(ValueError, match="at least the 16 native heads"):
        fm.MemoryIndexerModel.from_native(model, num_heads=4)
