"""Parts read in groups (read_groups.py): each trigger step keeps its own document's data and keys (the device
loader on groups against the host reference: test_device_batches.py)."""

import pytest
import torch
from training_helpers import TARGET_LAYERS

from fm_transformers.training.dataset import HostBatches
from fm_transformers.training.order import EpochOrder
from fm_transformers.training.read_groups import ReadGroups
from fm_transformers.training.shards import LabelShards
from fm_transformers.training.staging import tensor_names

LAYERS = list(TARGET_LAYERS)


@pytest.mark.parametrize("labels", ["train_labels", "split_train_labels"])
def test_groups_are_consecutive_parts_of_at_least_the_asked_trigger_steps(labels, request):
    shards = LabelShards(request.getfixturevalue(labels))
    counts = shards.part_triggers()
    groups = ReadGroups(shards, min_triggers=3 * max(counts))
    assert [part for group in groups.parts for part in group] == list(range(len(counts)))
    assert groups.part_triggers() == [sum(counts[part] for part in group) for group in groups.parts]
    assert all(triggers >= 3 * max(counts) for triggers in groups.part_triggers()[:-1])
    assert max(len(group) for group in groups.parts) > 1
    assert ReadGroups(shards, min_triggers=1).parts == [(part,) for part in range(len(counts))]
    with pytest.raises(ValueError, match="at least one trigger step"):
        ReadGroups(shards, min_triggers=0)


@pytest.mark.parametrize("labels", ["train_labels", "split_train_labels"])
def test_a_group_read_holds_each_trigger_steps_own_rows_labels_and_keys(labels, request):
    shards = LabelShards(request.getfixturevalue(labels))
    groups = ReadGroups(shards, min_triggers=3 * max(shards.part_triggers()))
    names = tensor_names(LAYERS)
    for number, group in enumerate(groups.parts):
        joined = groups.read_part(number, names)
        row = 0
        for part in group:
            own = shards.read_part(part, names)
            triggers = own["positions"].numel()
            assert torch.equal(joined["positions"][row : row + triggers], own["positions"])
            for trigger in range(triggers):
                at = row + trigger
                base = int(joined["key_base"][at]) if len(group) > 1 else 0
                ours = joined["labels/indices"][joined["labels/indptr"][at] : joined["labels/indptr"][at + 1]]
                theirs = own["labels/indices"][own["labels/indptr"][trigger] : own["labels/indptr"][trigger + 1]]
                assert torch.equal(ours, theirs)  # chunk ids of the document, not of the group
                for layer in LAYERS:
                    assert torch.equal(joined[f"hidden/{layer}"][at], own[f"hidden/{layer}"][trigger])
                    visible = own[f"keys/{layer}"].shape[0]
                    assert torch.equal(joined[f"keys/{layer}"][base : base + visible], own[f"keys/{layer}"])
            row += triggers
        assert row == joined["positions"].numel()


def test_a_host_sample_from_a_group_gathers_its_own_documents_keys(split_train_labels):
    shards = LabelShards(split_train_labels)
    groups = ReadGroups(shards, min_triggers=3 * max(shards.part_triggers()))
    order = EpochOrder(groups.part_triggers(), batch_size=8, seed=0, epoch=0)
    samples = HostBatches(groups, LAYERS, order, negative_ratio=3.0)
    number = max(range(len(groups.parts)), key=lambda index: len(groups.parts[index]))
    last = groups.parts[number][-1]  # the group's last part: its keys start after every other part's
    own = shards.read_part(last, tensor_names(LAYERS))
    first_row = groups.part_triggers()[number] - own["positions"].numel()
    for trigger in range(own["positions"].numel()):
        sample = samples.sample(number, first_row + trigger)
        positives = own["labels/indices"][own["labels/indptr"][trigger] : own["labels/indptr"][trigger + 1]]
        assert torch.equal(sample["candidates"][: positives.numel()], positives)
        for layer in LAYERS:
            assert torch.equal(sample["keys"][layer], own[f"keys/{layer}"][sample["candidates"]])
