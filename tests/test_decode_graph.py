"""CUDA-graph decode (decode_graph.py, static_decode.py): the fixed-shape step equals eager LSA decode, keeps
the cache coherent for what follows (a second turn, the pool, the report), and replays without host syncs."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import fm_transformers as fm
from fm_transformers import decode_graph
from fm_transformers.decode_graph import DecodeGraph, graph_safe_experts
from fm_transformers.policies import KeepAllPolicy, RandomPolicy
from fm_transformers.tiny import tiny_deepseek_v4

from tests.conftest import DEVICE, greedy, left_padded_batch, max_logit_difference, random_prompt

LSA_OPTIONS = {"tau": 8, "sink_chunks": 1, "recency_chunks": 1}


def padded_prompt(length=45, batch=2):
    prompt = random_prompt(length, batch=batch, seed=3)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    return prompt, mask


def decode(model, prompt, mask, policy, static: bool, capture: bool = False, new_tokens: int = 30, **options):
    cache = fm.OffloadedLookaheadCache(model, {**LSA_OPTIONS, **options}, policy=policy)
    if static:
        cache.decode_graph = DecodeGraph(model, cache, capture=capture)
    return greedy(model, prompt, max_new_tokens=new_tokens, attention_mask=mask, past_key_values=cache), cache


def pools_equal(first, second) -> bool:
    return all(
        torch.allclose(a.pools[kind].read(), b.pools[kind].read(), atol=1e-4)
        for a, b in zip(first.lookahead_layers(), second.lookahead_layers())
        for kind in a.pools
    )


@pytest.mark.parametrize("policy", [KeepAllPolicy, lambda: RandomPolicy(0.3, seed=1)], ids=["keep-all", "random"])
def test_fixed_shape_step_matches_eager_lsa_decode(model, policy):
    prompt, mask = padded_prompt()
    eager, eager_cache = decode(model, prompt, mask, policy(), static=False)
    static, static_cache = decode(model, prompt, mask, policy(), static=True)
    assert static_cache.decode_graph.state is not None  # the fixed-shape step did run
    assert max_logit_difference(eager, static) < 1e-4
    assert torch.equal(eager.sequences, static.sequences)
    assert static_cache.trigger_count == eager_cache.trigger_count >= 3
    fetched = [layer.bytes_fetched for layer in eager_cache.lookahead_layers()]
    assert [layer.bytes_fetched for layer in static_cache.lookahead_layers()] == fetched
    eager_report, static_report = eager_cache.memory_report(), static_cache.memory_report()  # the report flushes
    assert static_report["host"] == eager_report["host"]
    assert pools_equal(eager_cache, static_cache)
    assert static_report["device"]["decode_graph_state"] > 0 == eager_report["device"]["decode_graph_state"]


def test_second_turn_after_fixed_shape_decode_continues_like_eager(model):
    prompt, mask = padded_prompt()
    turns = []
    for static in (False, True):
        first, cache = decode(model, prompt, mask, RandomPolicy(0.3, seed=1), static=static, new_tokens=20)
        more = random_prompt(9, batch=2, seed=5)
        follow_up = torch.cat([first.sequences, more], dim=1)
        follow_mask = torch.cat([mask, torch.ones(2, follow_up.shape[1] - mask.shape[1], dtype=mask.dtype, device=DEVICE)], dim=1)
        turns.append(greedy(model, follow_up, max_new_tokens=16, attention_mask=follow_mask, past_key_values=cache))
    assert max_logit_difference(*turns) < 1e-4
    assert torch.equal(turns[0].sequences, turns[1].sequences)


def test_buckets_grow_when_a_recall_or_the_room_is_outgrown(model, monkeypatch):
    """Tiny capacities force both rebuilds: a keep-all recall outgrows the resident room, the tokens outgrow
    the room for entries. Decode goes on equal to eager."""
    monkeypatch.setattr(decode_graph, "MIN_RESIDENT_CAPACITY", 2)
    monkeypatch.setattr(decode_graph, "ROOM_TOKENS", 8)
    prompt, mask = padded_prompt()
    eager, _ = decode(model, prompt, mask, KeepAllPolicy(), static=False)
    builds = []
    original_build = DecodeGraph._build

    def counting_build(self, attention_mask):
        builds.append(self.tokens)
        original_build(self, attention_mask)

    monkeypatch.setattr(DecodeGraph, "_build", counting_build)
    static, _ = decode(model, prompt, mask, KeepAllPolicy(), static=True)
    assert len(builds) >= 3
    assert max_logit_difference(eager, static) < 1e-4
    assert torch.equal(eager.sequences, static.sequences)


@pytest.mark.gpu
def test_captured_buckets_rebuild_while_a_tensor_of_the_last_graph_lives_on(model, monkeypatch):
    """A rebuilt bucket captures a new graph while something allocated during the last capture is still
    referenced (here its output buffer): the new capture must not reuse the dropped graph's pool."""
    if DEVICE.type != "cuda":
        pytest.skip("FM_TEST_DEVICE=cuda runs it")
    monkeypatch.setattr(decode_graph, "MIN_RESIDENT_CAPACITY", 2)
    monkeypatch.setattr(decode_graph, "ROOM_TOKENS", 8)
    prompt, mask = padded_prompt()
    eager, _ = decode(model, prompt, mask, KeepAllPolicy(), static=True, capture=False)
    kept, original_release = [], DecodeGraph.release

    def release_keeping_the_output(self):
        kept.append(self.logits)
        original_release(self)

    monkeypatch.setattr(DecodeGraph, "release", release_keeping_the_output)
    graph, cache = decode(model, prompt, mask, KeepAllPolicy(), static=True, capture=True)
    assert cache.decode_graph.captures >= 2 and any(logits is not None for logits in kept)
    assert torch.equal(eager.sequences, graph.sequences)


def test_graph_safe_experts_match_eager_experts(model):
    """The MoE inside the graph (grouped_mm or batched_mm experts, no nonzero()) equals the eager loop."""
    block = model.model.layers[-1].mlp
    hidden = torch.randn(3, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    previous = model.config._experts_implementation
    model.config._experts_implementation = "eager"
    try:
        eager = block(hidden)
        with graph_safe_experts(model):
            assert model.config._experts_implementation in ("grouped_mm", "batched_mm")
            safe = block(hidden)
    finally:
        model.config._experts_implementation = previous
    torch.testing.assert_close(safe, eager, rtol=1e-5, atol=1e-5)


def test_refresh_layers_decode_eagerly(model):
    cache = fm.OffloadedLookaheadCache(model, {"refresh_layers": (2,)}, policy=KeepAllPolicy())
    with pytest.raises(ValueError, match="cuda_graph=False"):
        DecodeGraph(model, cache)


@pytest.mark.gpu
def test_graph_replay_equals_the_same_step_run_eagerly(model):
    if DEVICE.type != "cuda":
        pytest.skip("FM_TEST_DEVICE=cuda runs it")
    prompt, mask = padded_prompt()
    eager, _ = decode(model, prompt, mask, RandomPolicy(0.3, seed=1), static=True, capture=False, new_tokens=64)
    graph, cache = decode(model, prompt, mask, RandomPolicy(0.3, seed=1), static=True, capture=True, new_tokens=64)
    assert cache.decode_graph.replays >= 60 and cache.trigger_count >= 7
    assert torch.equal(eager.sequences, graph.sequences)
    assert max_logit_difference(eager, graph) == 0.0


@pytest.mark.gpu
def test_replayed_steps_make_no_host_sync(model):
    if DEVICE.type != "cuda":
        pytest.skip("FM_TEST_DEVICE=cuda runs it")
    prompt, mask = padded_prompt()
    cache = fm.OffloadedLookaheadCache(model, {**LSA_OPTIONS, "tau": 64}, policy=KeepAllPolicy())
    cache.decode_graph = runner = DecodeGraph(model, cache)
    greedy(model, prompt, max_new_tokens=2, attention_mask=mask, past_key_values=cache)  # prefill, warm-up, capture
    token = torch.ones(2, 1, dtype=torch.long, device=DEVICE)
    step_mask = torch.ones(2, runner.tokens + 1, dtype=torch.long, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):  # no trigger among them (tau 64)
            runner.step(token, step_mask)
            step_mask = torch.cat([step_mask, step_mask[:, :1]], dim=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert runner.replays >= 8


@pytest.mark.gpu
def test_generate_on_cuda_decodes_through_the_graph(model):
    if DEVICE.type != "cuda":
        pytest.skip("FM_TEST_DEVICE=cuda runs it")
    prompt, mask = padded_prompt()
    outputs = {}
    for use_graph in (False, True):
        options = {**LSA_OPTIONS, "cuda_graph": use_graph, "policy": RandomPolicy(0.3, seed=1)}
        outputs[use_graph] = greedy(model, prompt, max_new_tokens=32, attention_mask=mask, cache_implementation="lsa", cache_config=options)
    assert outputs[True].past_key_values.decode_graph.replays > 20
    assert outputs[False].past_key_values.decode_graph is None
    assert max_logit_difference(outputs[False], outputs[True]) < 1e-3
    assert torch.equal(outputs[False].sequences, outputs[True].sequences)


def test_sampling_processors_and_streamer_work_as_in_eager_decode(model):
    """do_sample with temperature and top-k (logits processors) and a streamer: the
    fixed-shape step draws the same tokens as eager LSA decode from the same seed."""

    class Collect:
        def __init__(self):
            self.pieces = []

        def put(self, value):
            self.pieces.append(value.clone())

        def end(self):
            self.pieces.append(None)

    prompt, mask = padded_prompt(batch=1)
    mask = mask[:1].fill_(1)
    runs = []
    for static in (False, True):
        cache = fm.OffloadedLookaheadCache(model, LSA_OPTIONS, policy=RandomPolicy(0.3, seed=1))
        if static:
            cache.decode_graph = DecodeGraph(model, cache, capture=False)
        streamer = Collect()
        torch.manual_seed(7)
        out = model.generate(prompt, attention_mask=mask, past_key_values=cache, do_sample=True, temperature=0.7, top_k=20,
                             max_new_tokens=24, pad_token_id=0, streamer=streamer)
        runs.append((out, streamer.pieces))
    assert torch.equal(runs[0][0], runs[1][0])
    assert len(runs[1][1]) == 24 + 2 and runs[1][1][-1] is None  # the prompt, 24 tokens, the end


def test_keep_all_graph_decode_matches_stock_to_rounding(indexed_model):
    """Nothing dropped: the fixed-shape step (sliding and HCA layers through the sparse attention kernel, whose
    sums run in another order than transformers' eager attention) equals stock to fp32 rounding, token for token."""
    input_ids, attention_mask = left_padded_batch()
    stock = greedy(indexed_model, input_ids, attention_mask=attention_mask)
    cache = fm.OffloadedLookaheadCache(indexed_model, {"tau": 8, "threshold": 0.0})
    cache.decode_graph = DecodeGraph(indexed_model, cache, capture=DEVICE.type == "cuda")
    lsa = greedy(indexed_model, input_ids, attention_mask=attention_mask, past_key_values=cache)
    assert cache.decode_graph.state is not None
    assert torch.equal(lsa.sequences, stock.sequences)
    assert max_logit_difference(lsa, stock) < 1e-4


def test_fixed_shape_step_runs_a_bf16_checkpoint_whose_position_biases_load_in_fp32(tmp_path):
    """transformers loads a bf16 DeepSeek-V4 with its compressors' position biases in fp32 (`_keep_in_fp32_modules`),
    so the stock gates come out fp32: the fixed-shape step must keep each buffer in the dtype of what fills it, not
    the cache keys' dtype, or its first step fails. In bf16 the tiny random model's logits move by whole units
    with rounding alone, so the step is held to bf16's own error: no farther from eager bf16 decode than eager bf16
    is from the same weights in fp32, at the first step that runs through it."""
    tiny_deepseek_v4(seed=0).to(torch.bfloat16).save_pretrained(tmp_path)
    runs = {}
    settings = (("eager", torch.bfloat16, False), ("static", torch.bfloat16, True), ("fp32", torch.float32, False))
    for name, dtype, static in settings:
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).to(DEVICE)
        fm.enable_bounded_prefill(model)
        runs[name], cache = decode(model, *padded_prompt(), KeepAllPolicy(), static=static, new_tokens=2)
        if static:
            compressor = next(layer.self_attn.compressor for layer in model.model.layers if layer.self_attn.compressor)
            assert compressor.position_bias.dtype == torch.float32 != compressor.kv_proj.weight.dtype
            assert cache.decode_graph.state is not None
    assert torch.equal(runs["eager"].sequences, runs["static"].sequences)
    assert torch.equal(runs["eager"].sequences, runs["fp32"].sequences)  # the same prefix: the logits compare
    static_error = (runs["static"].logits[1] - runs["eager"].logits[1]).abs().max()
    bf16_error = (runs["eager"].logits[1] - runs["fp32"].logits[1]).abs().max()
    assert static_error <= bf16_error
