import dataclasses
import random

import pytest
import torch

from fm_transformers.eval import TrainingConfig, build_eval_backbone, eval_backbone_config
from fm_transformers.eval.backbone_training import train_backbone, train_step
from fm_transformers.eval.batches import make_batch
from fm_transformers.eval.catalog import training_example
from fm_transformers.eval.distillation import IndexerDistillation, set_dense_csa
from fm_transformers.eval.long_tasks import LONG_TASK_NAMES, evidence_chunks
from fm_transformers.eval.restricted_candidates import CandidateDraw, CandidateRestriction
from fm_transformers.layout import csa_layers

LENGTH = 256
RATE = 4
LONG_MIX = tuple((task, {}) for task in LONG_TASK_NAMES)


def long_example(task: str, seed: int):
    return training_example(task, LENGTH, random.Random(seed))


@pytest.mark.parametrize("task", LONG_TASK_NAMES)
def test_a_restricted_example_keeps_its_evidence_and_a_random_share_of_the_rest(task):
    example = long_example(task, 1)
    chunks = LENGTH // RATE
    evidence = [chunk for chunk in evidence_chunks(example, RATE) if chunk < chunks]  # a last one may be unmade
    assert CandidateDraw(1.0, 0.0, RATE).draw(example, chunks, random.Random(0)) == evidence
    sizes = set()
    for seed in range(20):
        kept = CandidateDraw(1.0, 0.5, RATE).draw(example, chunks, random.Random(seed))
        assert set(evidence) <= set(kept) and kept == sorted(kept) and all(0 <= c < chunks for c in kept)
        sizes.add(len(kept) - len(evidence))
        assert max(sizes) <= 0.5 * (chunks - len(evidence)) + 0.5
    assert len(sizes) > 5  # the share is drawn, not fixed


def test_only_long_tasks_drawn_by_the_share_are_restricted():
    rng = random.Random(0)
    assert CandidateDraw(1.0, 0.2, RATE).draw(training_example("qa_document", LENGTH, rng), 64, rng) is None
    assert CandidateDraw(0.0, 0.2, RATE).draw(long_example("long_chain", 2), 64, rng) is None
    half = CandidateDraw(0.5, 0.2, RATE)
    drawn = [half.draw(long_example("long_chain", 2), 64, random.Random(seed)) for seed in range(200)]
    assert 70 < sum(kept is not None for kept in drawn) < 130
    with pytest.raises(ValueError, match="share must lie in"):
        CandidateDraw(1.5, 0.2, RATE)


def test_candidates_leave_the_batch_as_it_was_and_restrict_the_answer_rows():
    draw = CandidateDraw(1.0, 0.1, RATE)
    plain = make_batch(3, 7, LENGTH, 3, LONG_MIX)
    restricted = make_batch(3, 7, LENGTH, 3, LONG_MIX, draw)
    assert plain.candidate_chunks is None and plain.restricted_from is None
    for name in ("input_ids", "targets", "distill_rows"):
        assert torch.equal(getattr(plain, name), getattr(restricted, name))
    width = plain.input_ids.shape[1]
    assert restricted.candidate_chunks.shape == (3, width // RATE)
    first_answer_targets = (plain.targets != -100).int().argmax(dim=1)
    # the first answer token is predicted by the prefill's last row, unrestricted; the rest are restricted
    assert torch.equal(restricted.restricted_from, first_answer_targets + 1)
    assert restricted.candidate_chunks.any(dim=1).all()


def restricted_paper_smoke():
    model = build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0).eval()
    set_dense_csa(model, False)
    batch = make_batch(5, 0, LENGTH, 3, LONG_MIX, CandidateDraw(1.0, 0.05, RATE))
    return model, batch


def forward_with_picks(model, batch, restriction=None):
    picks = []
    handles = [
        model.model.layers[i].self_attn.compressor.indexer.register_forward_hook(lambda m, a, out: picks.append(out))
        for i in csa_layers(model.config)
    ]
    try:
        if restriction is not None:
            restriction.use(batch.candidate_chunks, batch.restricted_from, batch.input_ids.shape[1])
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, picks


def allowed_by_hand(batch, row: int, example: int, tail: int, sink: int) -> set[int]:
    complete = (row + 1) // RATE
    kept = set(batch.candidate_chunks[example].nonzero().flatten().tolist())
    return kept | set(range(max(0, complete - tail), complete)) | set(range(sink))


def test_the_restriction_leaves_the_prefill_rows_and_keeps_the_answer_rows_among_the_candidates():
    model, batch = restricted_paper_smoke()
    stock_logits, stock_picks = forward_with_picks(model, batch)
    with CandidateRestriction(model, tail_chunks=2, sink_chunks=1) as restriction:
        logits, picks = forward_with_picks(model, batch, restriction)
    stock_outside = 0
    for layer_stock, layer_picks in zip(stock_picks, picks, strict=True):
        for b, first in enumerate(batch.restricted_from.tolist()):
            assert torch.equal(layer_stock[b, :first], layer_picks[b, :first])
            for row in range(first, batch.input_ids.shape[1]):
                allowed = allowed_by_hand(batch, row, b, tail=2, sink=1)
                chosen = set(layer_picks[b, row].tolist()) - {-1}
                causal = {chunk for chunk in allowed if chunk < (row + 1) // RATE}
                assert chosen <= allowed and len(chosen) == min(model.config.index_topk, len(causal))
                stock_outside += len(set(layer_stock[b, row].tolist()) - {-1} - allowed)
    assert stock_outside > 0  # the stock top-k did pick outside the candidates: the restriction changed picks
    for b, first in enumerate(batch.restricted_from.tolist()):
        torch.testing.assert_close(logits[b, :first], stock_logits[b, :first])
    starts = enumerate(batch.restricted_from.tolist())
    answer_rows = torch.cat([logits[b, first:] - stock_logits[b, first:] for b, first in starts])
    assert answer_rows.abs().max() > 1e-3


def test_every_chunk_a_candidate_is_the_stock_model_and_leaving_the_context_removes_the_hooks():
    model, batch = restricted_paper_smoke()
    everything = dataclasses.replace(batch, candidate_chunks=torch.ones_like(batch.candidate_chunks))
    stock_logits, stock_picks = forward_with_picks(model, batch)
    with CandidateRestriction(model) as restriction:
        logits, picks = forward_with_picks(model, everything, restriction)
    torch.testing.assert_close(logits, stock_logits)
    assert all(torch.equal(a, b) for a, b in zip(stock_picks, picks, strict=True))
    after, _ = forward_with_picks(model, batch)
    torch.testing.assert_close(after, stock_logits)


def test_answer_rows_without_any_candidate_pick_no_entry():
    model, batch = restricted_paper_smoke()
    nothing = dataclasses.replace(batch, candidate_chunks=torch.zeros_like(batch.candidate_chunks))
    _, stock_picks = forward_with_picks(model, batch)
    with CandidateRestriction(model, tail_chunks=0, sink_chunks=0) as restriction:
        _, picks = forward_with_picks(model, nothing, restriction)
    for layer_stock, layer_picks in zip(stock_picks, picks, strict=True):
        for b, first in enumerate(batch.restricted_from.tolist()):
            assert (layer_picks[b, first:] == -1).all() and (layer_stock[b, first:] >= 0).any()


def test_a_restriction_for_another_length_is_an_error():
    model, batch = restricted_paper_smoke()
    with CandidateRestriction(model) as restriction, pytest.raises(ValueError, match="candidate chunks for"):
        restriction.use(batch.candidate_chunks, batch.restricted_from, batch.input_ids.shape[1] + RATE)


def test_the_restriction_is_entered_before_the_distillation_and_its_hooks_are_first_by_insertion():
    """torch.compile (2.11) guards a module's hooks by the dict's insertion order: a prepended hook made it read
    the distillation's attributes off the restriction's hook (found on an H100)."""
    model, _ = restricted_paper_smoke()
    with CandidateRestriction(model) as restriction, IndexerDistillation(model):
        for index in csa_layers(model.config):
            indexer = model.model.layers[index].self_attn.compressor.indexer
            first_on_scores = indexer.scorer._forward_hooks[list(dict.keys(indexer.scorer._forward_hooks))[0]]
            first_on_picks = indexer._forward_hooks[list(dict.keys(indexer._forward_hooks))[0]]
            assert first_on_scores.__self__ is restriction and first_on_picks.__self__ is restriction
    with IndexerDistillation(model), pytest.raises(RuntimeError, match="enter CandidateRestriction first"):
        with CandidateRestriction(model):
            pass
    assert not any(model.model.layers[i].self_attn.compressor.indexer._forward_hooks for i in csa_layers(model.config))


def restricted_config(**changes) -> TrainingConfig:
    return TrainingConfig(
        size="paper-smoke", mix="long", steps=2, dense_steps=0, min_length=LENGTH, max_length=LENGTH, ramp_steps=0,
        tokens_per_step=2 * LENGTH, warmup_steps=1, precision="fp32", restricted_share=1.0, **changes,
    )


def test_a_restricted_run_trains_and_a_step_without_the_hooks_is_an_error(tmp_path):
    config = restricted_config()
    assert config.batch_for(0).candidate_chunks is not None
    assert dataclasses.replace(config, restricted_share=0.0).batch_for(0).candidate_chunks is None
    run = train_backbone(config, tmp_path, progress=False)
    assert run.finished and all(torch.isfinite(torch.tensor(m["loss"])) for m in run.history)
    model = build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with IndexerDistillation(model) as distillation, pytest.raises(ValueError, match="CandidateRestriction"):
        train_step(model, distillation, optimizer, config, 0, "cpu")
    with pytest.raises(ValueError, match=r"random_max must lie in \[0, 1\]"):
        restricted_config(restricted_random=-0.1)


def test_a_restricted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    config = dataclasses.replace(restricted_config(), steps=3)
    straight = train_backbone(config, tmp_path / "straight", progress=False)
    stopped = train_backbone(config, tmp_path / "resumed", max_minutes=0, progress=False)
    assert not stopped.finished
    resumed = train_backbone(config, tmp_path / "resumed", resume=True, progress=False)
    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    assert resumed.finished and all(torch.equal(expected[name], actual[name]) for name in expected)
