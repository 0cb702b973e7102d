import pytest
import torch

from fm_transformers.eval.backbone_training import answer_loss
from fm_transformers.eval.distillation import (
    IndexerDistillation,
    indexer_kl,
    indexer_parameter_names,
    set_dense_csa,
)
from fm_transformers.layout import csa_layers


def forward(model, distillation, batch, dense: bool):
    """One training forward: returns (answer loss, distillation loss)."""
    set_dense_csa(model, dense)
    distillation.rows = batch.distill_rows
    loss, _ = answer_loss(model(input_ids=batch.input_ids, use_cache=False).logits, batch.targets)
    return loss, distillation.loss()


def gradients(model) -> dict[str, float]:
    return {name: 0.0 if p.grad is None else p.grad.abs().sum().item() for name, p in model.named_parameters()}


def test_kl_is_zero_when_the_indexer_agrees_with_the_attention_and_positive_otherwise():
    mass = torch.tensor([[0.1, 0.3, 0.6, 0.0]])
    selected = torch.tensor([[True, True, True, False]])
    matching = torch.tensor([[0.1, 0.3, 0.6, 5.0]]).log()  # the unselected entry's score must not count
    assert indexer_kl(matching, mass, selected).item() == pytest.approx(0.0, abs=1e-6)
    assert indexer_kl(torch.zeros(1, 4), mass, selected).item() > 0.1


def test_kl_leaves_out_rows_without_attention_on_any_selected_entry():
    mass = torch.tensor([[0.0, 0.0], [0.5, 0.5]])
    selected = torch.tensor([[False, False], [True, True]])
    assert indexer_kl(torch.zeros(2, 2), mass, selected).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(indexer_kl(torch.zeros(1, 2), mass[:1], selected[:1]))


@pytest.mark.parametrize("dense", [True, False])
def test_distillation_loss_trains_every_indexer_and_nothing_else(smoke_model, smoke_batch, dense):
    indexer_names = indexer_parameter_names(smoke_model)
    assert indexer_names and all(".compressor.indexer." in name for name in indexer_names)
    with IndexerDistillation(smoke_model) as distillation:
        _, kl = forward(smoke_model, distillation, smoke_batch, dense)
    assert torch.isfinite(kl) and kl.item() > 0
    kl.backward()
    grads = gradients(smoke_model)
    assert all(grads[name] == 0.0 for name in grads if name not in indexer_names)
    for layer in csa_layers(smoke_model.config):
        prefix = f"model.layers.{layer}.self_attn.compressor.indexer."
        assert grads[prefix + "q_b_proj.weight"] > 0 and grads[prefix + "kv_proj.weight"] > 0
        assert grads[prefix + "scorer.weights_proj.weight"] > 0


def test_answer_loss_sends_no_gradient_to_the_indexers(smoke_model, smoke_batch):
    indexer_names = indexer_parameter_names(smoke_model)
    with IndexerDistillation(smoke_model) as distillation:
        loss, _ = forward(smoke_model, distillation, smoke_batch, dense=False)
    loss.backward()
    grads = gradients(smoke_model)
    assert all(grads[name] == 0.0 for name in indexer_names)
    assert sum(grads[name] for name in grads if name not in indexer_names) > 0


def test_dense_csa_selects_every_causal_entry_and_sparse_csa_the_configured_top_k(smoke_model, smoke_batch):
    config = smoke_model.config
    indexer = smoke_model.model.layers[csa_layers(config)[0]].self_attn.compressor.indexer
    picks = []
    handle = indexer.register_forward_hook(lambda module, args, top_k: picks.append((top_k[0] >= 0).sum(-1)))
    ids = smoke_batch.input_ids[:1]
    causal = (torch.arange(ids.shape[1]) + 1) // config.compress_rates["compressed_sparse_attention"]
    for dense, expected in ((True, causal), (False, causal.clamp(max=config.index_topk))):
        set_dense_csa(smoke_model, dense)
        with torch.no_grad():
            smoke_model(input_ids=ids, use_cache=False)
        assert torch.equal(picks.pop(), expected)
    handle.remove()


def test_hooks_are_removed_on_exit(smoke_model):
    with IndexerDistillation(smoke_model):
        pass
    indexer = smoke_model.model.layers[csa_layers(smoke_model.config)[0]].self_attn.compressor.indexer
    assert not indexer._forward_hooks and not indexer._forward_pre_hooks


def test_loss_without_a_forward_is_an_error(smoke_model):
    with IndexerDistillation(smoke_model) as distillation, pytest.raises(RuntimeError, match="forward"):
        distillation.loss()


def test_the_hooked_paper_layout_forward_traces_as_one_graph():
    """--compile's premise: with every CSA layer hooked, the training forward is one graph. Hooks that differed per
    layer made torch.compile trace each CSA layer apart (14 graphs), past its recompile limit (deep layers eager)."""
    import torch._dynamo

    from fm_transformers.eval import build_eval_backbone, eval_backbone_config

    model = build_eval_backbone(eval_backbone_config("paper-smoke"), seed=0).train()
    input_ids = torch.randint(8, 200, (2, 48))
    torch._dynamo.reset()
    with IndexerDistillation(model) as distillation:
        explained = torch._dynamo.explain(model)(input_ids=input_ids, use_cache=False)
        distillation.loss()  # the traced forward captured every CSA layer once
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
