"""A resident set that holds every chunk the native top-k will pick gives the stock output; without them it does not."""

import torch

import fm_transformers as fm
from fm_transformers.layout import csa_layers
from tests.conftest import greedy, max_logit_difference, random_prompt

TAU = 4
PROMPT_LENGTH = 201  # 50 chunks: the native top-k of 4 layers over 4 steps does not cover them all
NEW_TOKENS = 24


def native_picks_per_forward(model, prompt):
    """Stock greedy run; per forward call, the union over CSA layers of the native top-k chunk ids (per sequence).
    The bounded prefill does not call the stock indexer module, so the prefill forward records no picks (no
    oracle set reads them: set i serves the forwards after trigger i)."""
    picks: list[list[set]] = []

    def next_forward(module, args, kwargs):
        batch = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        picks.append([set() for _ in range(batch)])

    def record(module, args, output):
        for row in range(output.shape[0]):
            picks[-1][row] |= set(output[row, -1][output[row, -1] >= 0].tolist())

    hooks = [model.model.layers[i].self_attn.compressor.indexer.register_forward_hook(record) for i in csa_layers(model.config)]
    hooks.append(model.model.register_forward_pre_hook(next_forward, with_kwargs=True))
    try:
        stock = greedy(model, prompt, max_new_tokens=NEW_TOKENS)
    finally:
        for hook in hooks:
            hook.remove()
    return stock, picks


def oracle_sets(picks, remove=frozenset()):
    """Set i serves forwards after trigger i: forward i*TAU is the trigger, the next TAU forwards use the set."""
    sets = []
    for trigger_forward in range(0, len(picks), TAU):
        rows = []
        for row in range(len(picks[0])):
            needed = set().union(*(picks[f][row] for f in range(trigger_forward + 1, min(trigger_forward + TAU + 1, len(picks)))))
            rows.append(torch.tensor(sorted(needed - remove), dtype=torch.long))
        sets.append(rows)
    return sets


def run_with(model, prompt, sets):
    config = {"tau": TAU, "recency_chunks": 0, "sink_chunks": 0}
    return greedy(model, prompt, max_new_tokens=NEW_TOKENS, past_key_values=fm.OffloadedLookaheadCache(model, config, fm.OraclePolicy(sets)))


def test_oracle_resident_set_matches_stock_generation(model):
    prompt = random_prompt(PROMPT_LENGTH, seed=7)
    stock, picks = native_picks_per_forward(model, prompt)
    lsa = run_with(model, prompt, oracle_sets(picks))
    assert torch.equal(lsa.sequences, stock.sequences)
    assert max_logit_difference(lsa, stock) < 1e-5
    sizes = [len(rows[0]) for rows in oracle_sets(picks)]
    assert max(sizes) < PROMPT_LENGTH // 4  # every oracle set really dropped chunks


def test_oracle_without_needed_chunks_changes_output(model):
    prompt = random_prompt(PROMPT_LENGTH, seed=7)
    stock, picks = native_picks_per_forward(model, prompt)
    most_used = {chunk for forward in picks[1 : TAU + 1] for chunk in forward[0]}
    lsa = run_with(model, prompt, oracle_sets(picks, remove=frozenset(most_used)))
    assert max_logit_difference(lsa, stock) > 1e-3
