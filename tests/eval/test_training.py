import dataclasses
import math

import pytest
import torch
from transformers import DeepseekV4ForCausalLM

from fm_transformers.eval import (
    TrainingConfig,
    build_eval_backbone,
    eval_backbone_config,
    evaluate_backbone,
    train_backbone,
)
from fm_transformers.eval.backbone_training import (
    CHECKPOINT_NAME,
    MODEL_DIR_NAME,
    initial_model,
)
from fm_transformers.eval.batches import TRAINING_MIX
from fm_transformers.layout import csa_layers
from fm_transformers.eval.tasks import TASK_NAMES
from fm_transformers.eval.vocab import TASK_TOKENS


def test_three_training_steps_have_finite_losses_and_go_from_dense_to_sparse(smoke_config, tmp_path):
    run = train_backbone(smoke_config, tmp_path, progress=False)
    assert run.finished and [m["phase"] for m in run.history] == ["dense", "dense", "sparse"]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["kl"]) and m["kl"] > 0 for m in run.history)
    layers = run.model.model.layers
    indexers = [layers[i].self_attn.compressor.indexer for i in csa_layers(run.model.config)]
    assert all(indexer.index_topk == run.model.config.index_topk for indexer in indexers)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(smoke_config, tmp_path):
    straight = train_backbone(smoke_config, tmp_path / "straight", progress=False)
    stopped = train_backbone(smoke_config, tmp_path / "resumed", max_minutes=0, progress=False)
    assert not stopped.finished and len(stopped.history) == 1
    resumed = train_backbone(smoke_config, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.finished and [m["step"] for m in resumed.history] == [2, 3]
    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_resuming_with_other_settings_is_an_error_that_names_them(smoke_config, tmp_path):
    train_backbone(smoke_config, tmp_path, max_minutes=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_backbone(dataclasses.replace(smoke_config, lr=0.5), tmp_path, resume=True, progress=False)


def test_an_existing_run_without_resume_is_an_error(smoke_config, tmp_path):
    train_backbone(smoke_config, tmp_path, max_minutes=0, progress=False)
    assert (tmp_path / CHECKPOINT_NAME).exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train_backbone(smoke_config, tmp_path, progress=False)


def test_the_trained_model_loads_back_with_its_hash_routing_table(smoke_config, tmp_path):
    run = train_backbone(smoke_config, tmp_path, progress=False)
    loaded = DeepseekV4ForCausalLM.from_pretrained(tmp_path / MODEL_DIR_NAME)
    expected = run.model.state_dict()
    assert all(torch.equal(expected[name], tensor) for name, tensor in loaded.state_dict().items())
    assert loaded.model.layers[0].mlp.gate.tid2eid.unique().numel() > 1


def test_evaluate_backbone_reports_every_task_at_every_length(smoke_model):
    results = evaluate_backbone(smoke_model, [96, 128], examples_per_task=1, progress=False)
    assert list(results) == [96, 128]
    assert all(list(row) == list(TASK_NAMES) and all(0 <= v <= 1 for v in row.values()) for row in results.values())


def test_dense_evaluation_shows_every_entry_to_csa_and_restores_the_served_top_k(smoke_model):
    indexers = [smoke_model.model.layers[i].self_attn.compressor.indexer for i in csa_layers(smoke_model.config)]
    widths = []
    handle = indexers[0].register_forward_hook(lambda module, args, top_k: widths.append(top_k.shape[-1]))
    try:
        evaluate_backbone(smoke_model, [128], examples_per_task=1, progress=False, dense_csa=True)
    finally:
        handle.remove()
    top_k = smoke_model.config.index_topk
    assert max(widths) >= 128 // 4 > top_k  # queries chose among all (32+) entries, not the top 4
    assert all(indexer.index_topk == top_k for indexer in indexers)


def test_a_second_stage_starts_from_the_saved_weights_in_fp32(smoke_config, tmp_path):
    first = train_backbone(smoke_config, tmp_path / "first", progress=False)
    first.model.to(torch.bfloat16).save_pretrained(tmp_path / "first-bf16")
    second = dataclasses.replace(smoke_config, init_from=str(tmp_path / "first-bf16"), steps=1, dense_steps=0)
    start = initial_model(second)
    saved = first.model.state_dict()
    assert all(t.dtype == torch.float32 for t in start.state_dict().values() if t.is_floating_point())
    assert all(torch.equal(saved[name].float(), tensor.float()) for name, tensor in start.state_dict().items())
    fresh = initial_model(smoke_config).state_dict()
    assert not torch.equal(fresh["model.embed_tokens.weight"], start.state_dict()["model.embed_tokens.weight"])
    run = train_backbone(second, tmp_path / "second", progress=False)
    assert run.finished and math.isfinite(run.history[0]["loss"])


def test_a_stage_that_widens_the_sliding_window_keeps_the_weights_and_saves_the_new_window(smoke_config, tmp_path):
    """A later stage may train the same weights with a wider window; what it saves must carry the wider one, since
    the dump, the scorer and the comparison read the window from the saved config."""
    window = eval_backbone_config("smoke").sliding_window
    build_eval_backbone(eval_backbone_config("smoke"), seed=0).save_pretrained(tmp_path / "first")
    wider = dataclasses.replace(
        smoke_config, init_from=str(tmp_path / "first"), sliding_window=2 * window, steps=1, dense_steps=0
    )
    start = initial_model(wider)
    assert start.config.sliding_window == 2 * window
    saved = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "first").state_dict()
    assert all(torch.equal(saved[name], tensor) for name, tensor in start.state_dict().items())
    run = train_backbone(wider, tmp_path / "wider", progress=False)
    assert run.finished
    assert DeepseekV4ForCausalLM.from_pretrained(tmp_path / "wider" / MODEL_DIR_NAME).config.sliding_window == 2 * window
    with pytest.raises(ValueError, match="other settings .*sliding_window"):
        train_backbone(dataclasses.replace(wider, sliding_window=None), tmp_path / "wider", resume=True, progress=False)
    with pytest.raises(ValueError, match="sliding_window must be at least 1"):
        dataclasses.replace(smoke_config, sliding_window=0)


def test_init_from_another_size_or_a_missing_model_is_a_clear_error(smoke_config, tmp_path):
    build_eval_backbone(eval_backbone_config("small"), seed=0).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="not a 'smoke' evaluation backbone"):
        initial_model(dataclasses.replace(smoke_config, init_from=str(tmp_path / "small")))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        initial_model(dataclasses.replace(smoke_config, init_from=str(tmp_path / "missing")))
    # the same size with its output layer tied: loading it would silently keep one of the two matrices
    tied = eval_backbone_config("smoke", tie_word_embeddings=True)
    build_eval_backbone(tied, seed=0).save_pretrained(tmp_path / "tied")
    with pytest.raises(ValueError, match="has tied embeddings, size 'smoke' untied ones"):
        initial_model(dataclasses.replace(smoke_config, init_from=str(tmp_path / "tied")))


def test_extra_tasks_are_drawn_more_often_and_must_be_evaluation_tasks(smoke_config):
    weighted = dataclasses.replace(
        smoke_config, tokens_per_step=smoke_config.max_length * 110, extra_tasks=("common_words",)
    )

    def count(config):
        batch = config.batch_for(0)
        return int((batch.input_ids[:, 1] == TASK_TOKENS["common_words"]).sum()), batch.input_ids.shape[0]

    plain_count, rows = count(dataclasses.replace(weighted, extra_tasks=()))
    weighted_count, _ = count(weighted)
    # 110 rows: the plain mix (10 entries) draws common words 11 times, the weighted one (11 entries) 2 * 10
    assert rows == 110 and len(TRAINING_MIX) == 10 and (plain_count, weighted_count) == (11, 20)
    with pytest.raises(ValueError, match="extra_tasks must be evaluation tasks"):
        dataclasses.replace(smoke_config, extra_tasks=("associative_recall",))


def test_a_checkpoint_of_a_run_with_extra_tasks_resumes(smoke_config, tmp_path):
    config = dataclasses.replace(smoke_config, extra_tasks=("variable_tracking",))
    train_backbone(config, tmp_path, max_minutes=0, progress=False)
    assert train_backbone(config, tmp_path, resume=True, progress=False).finished


def test_the_paper_layout_backbone_on_the_long_mix_resumes_to_the_uninterrupted_weights(tmp_path):
    config = TrainingConfig(
        size="paper-smoke", mix="long", steps=3, dense_steps=1, min_length=256, max_length=256, ramp_steps=0,
        tokens_per_step=512, warmup_steps=1, precision="fp32",
    )
    straight = train_backbone(config, tmp_path / "straight", progress=False)
    stopped = train_backbone(config, tmp_path / "resumed", max_minutes=0, progress=False)
    assert not stopped.finished and len(stopped.history) == 1
    resumed = train_backbone(config, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.finished and [m["step"] for m in resumed.history] == [2, 3]
    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_extra_tasks_must_belong_to_the_mix_evaluated(smoke_config):
    with pytest.raises(ValueError, match="qa_block"):
        dataclasses.replace(smoke_config, mix="long", extra_tasks=("variable_tracking",))
    with pytest.raises(ValueError, match="mix must be one of"):
        dataclasses.replace(smoke_config, mix="unknown")


@pytest.mark.gpu
def test_a_compiled_run_trains_the_weights_of_an_eager_one(smoke_config, tmp_path):
    """compile=True fuses the launch-bound step; it must not change what is learnt beyond float rounding. GPU
    only: inductor takes minutes to compile this model on a CPU."""
    config = dataclasses.replace(smoke_config, precision="fp32")
    eager = train_backbone(config, tmp_path / "eager", device="cuda", progress=False)
    compiled = train_backbone(config, tmp_path / "compiled", device="cuda", progress=False, compile=True)
    for ran, reference in zip(compiled.history, eager.history, strict=True):
        assert ran["loss"] == pytest.approx(reference["loss"], rel=1e-3)
        assert ran["kl"] == pytest.approx(reference["kl"], rel=1e-2)
    expected, actual = eager.model.state_dict(), compiled.model.state_dict()
    for name, tensor in expected.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(actual[name], tensor, rtol=1e-3, atol=1e-4, msg=name)


def test_fresh_weights_on_contexts_beyond_the_window_warn_and_a_second_stage_does_not(smoke_config, tmp_path, caplog):
    """Such a curriculum stayed on the loss plateau on the GPU: the user is told before minutes are spent."""
    window = eval_backbone_config("smoke").sliding_window
    beyond = dataclasses.replace(smoke_config, min_length=window * 4, max_length=window * 4)
    inside = dataclasses.replace(smoke_config, min_length=window, max_length=window * 4)
    with caplog.at_level("WARNING", logger="fm_transformers.eval.backbone_training"):
        initial_model(inside)
        assert "sliding window" not in caplog.text
        initial_model(beyond)
        assert f"beyond the {window}-token sliding window" in caplog.text
        caplog.clear()
        build_eval_backbone(eval_backbone_config("smoke"), seed=0).save_pretrained(tmp_path / "first")
        initial_model(dataclasses.replace(beyond, init_from=str(tmp_path / "first")))
        assert "sliding window" not in caplog.text
