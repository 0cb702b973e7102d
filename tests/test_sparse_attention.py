"""LSA decode attention (sparse decode attention over window + picks + sink) against the stock eager attention."""

import pytest
import torch
from transformers import DynamicCache

import fm_transformers as fm
from fm_transformers import attention as lsa_attention
from fm_transformers.attention import window_bias
from tests.conftest import DEVICE, greedy, max_logit_difference, random_prompt

FIRST_CSA_LAYER = 2  # its inputs do not depend on earlier CSA layers, so stock and LSA see the same hidden states


def left_padded_batch(lengths, width):
    """Prompts of `lengths` left-padded to `width`: (input_ids, attention_mask)."""
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long, device=DEVICE)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = random_prompt(length, seed=row)[0]
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


@pytest.fixture
def sparse_calls(monkeypatch):
    """Counts the decode steps that took the sparse attention path."""
    calls = []
    stock = lsa_attention.sparse_decode_forward

    def counted(*args, **kwargs):
        calls.append(args[0].layer_idx)
        return stock(*args, **kwargs)

    monkeypatch.setattr(lsa_attention, "sparse_decode_forward", counted)
    return calls


def attention_outputs(model, layer_idx, run):
    outputs = []
    hook = model.model.layers[layer_idx].self_attn.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    try:
        run()
    finally:
        hook.remove()
    return outputs


def test_sparse_decode_attention_matches_stock_eager_with_padding_inside_the_window(model, sparse_calls):
    """Sequence 1 has 9 pad tokens among the 16 window slots of the first decode steps: the kernel must mask
    them exactly as the stock eager attention does."""
    input_ids, attention_mask = left_padded_batch([23, 14], width=23)
    policy = fm.KeepAllPolicy()

    def decode(cache):
        with torch.no_grad():
            model(input_ids, attention_mask=attention_mask, past_key_values=cache)
            for step in range(6):
                token = random_prompt(1, batch=2, seed=10 + step)
                mask = torch.cat([attention_mask, torch.ones(2, step + 1, dtype=torch.long, device=DEVICE)], dim=1)
                position_ids = mask.sum(dim=1, keepdim=True) - 1
                model(token, attention_mask=mask, position_ids=position_ids, past_key_values=cache)

    stock = attention_outputs(model, FIRST_CSA_LAYER, lambda: decode(DynamicCache(config=model.config)))
    lsa = attention_outputs(model, FIRST_CSA_LAYER, lambda: decode(fm.OffloadedLookaheadCache(model, {"tau": 2}, policy)))
    assert sparse_calls.count(FIRST_CSA_LAYER) == 6
    for stock_step, lsa_step in zip(stock[1:], lsa[1:]):
        torch.testing.assert_close(lsa_step, stock_step, rtol=1e-5, atol=1e-6)


def test_ignoring_the_window_mask_changes_the_padded_sequence(model, monkeypatch):
    """The check above can fail: attending the pad slots gives another output for the padded sequence only."""
    input_ids, attention_mask = left_padded_batch([23, 14], width=23)
    cache_config = {"tau": 2}
    runs = {}
    for name in ("masked", "unmasked"):
        if name == "unmasked":
            monkeypatch.setattr(lsa_attention, "window_bias", lambda mask, window: torch.zeros(window.shape[:2], device=window.device))
        cache = fm.OffloadedLookaheadCache(model, cache_config, fm.KeepAllPolicy())
        runs[name] = greedy(model, input_ids, max_new_tokens=4, attention_mask=attention_mask, past_key_values=cache)
    first, second = (torch.stack([step[row] for step in runs["masked"].logits[1:]]) for row in (0, 1))
    first_u, second_u = (torch.stack([step[row] for step in runs["unmasked"].logits[1:]]) for row in (0, 1))
    torch.testing.assert_close(first_u, first)
    assert (second_u - second).abs().max() > 1e-3


def test_left_padded_keep_all_generation_with_padding_in_the_window_matches_stock(model, sparse_calls):
    input_ids, attention_mask = left_padded_batch([23, 14, 19], width=23)
    stock = greedy(model, input_ids, max_new_tokens=12, attention_mask=attention_mask)
    cache = fm.OffloadedLookaheadCache(model, {"tau": 3}, policy=fm.KeepAllPolicy())
    lsa = greedy(model, input_ids, max_new_tokens=12, attention_mask=attention_mask, past_key_values=cache)
    assert sparse_calls  # decode really went through the sparse attention
    assert torch.equal(lsa.sequences, stock.sequences)
    assert max_logit_difference(lsa, stock) < 1e-5


def test_window_bias_reads_the_decode_row_of_float_and_boolean_masks():
    window = torch.zeros(2, 4, 8)
    minimum = torch.finfo(torch.float32).min
    float_mask = torch.tensor([[0.0, 0.0, 0.0, 0.0], [minimum, minimum, 0.0, 0.0]]).view(2, 1, 1, 4)
    bool_mask = torch.tensor([[True, True, True, True], [False, False, True, True]]).view(2, 1, 1, 4)
    assert torch.equal(window_bias(float_mask, window), float_mask[:, 0, 0])
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [float("-inf"), float("-inf"), 0.0, 0.0]])
    assert torch.equal(window_bias(bool_mask, window), expected)
    assert torch.equal(window_bias(None, window), torch.zeros(2, 4))
    assert torch.equal(window_bias(float_mask[:1], window), torch.zeros(2, 4))  # a batch-1 mask broadcasts


def test_window_bias_refuses_a_mask_of_another_length():
    with pytest.raises(ValueError, match="sliding window holds 4"):
        window_bias(torch.zeros(1, 1, 1, 5), torch.zeros(1, 4, 8))


def test_prefill_and_non_lsa_caches_take_the_stock_attention(model, sparse_calls):
    with torch.no_grad():
        model(random_prompt(30), past_key_values=DynamicCache(config=model.config))
        model(random_prompt(30), past_key_values=fm.OffloadedLookaheadCache(model, policy=fm.KeepAllPolicy()))
    assert sparse_calls == []
