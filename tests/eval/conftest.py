"""Fixtures of the evaluation tests: a smoke-size backbone and training config, on one CPU thread.

One thread because these tests run many tiny matrix products: on shared cores, a second thread makes each of
them spin-wait for a busy core and the tests an order of magnitude slower. The thread count is restored after
each test, so other test directories keep theirs.
"""

import pytest
import torch

from fm_transformers.eval import (
    TrainingConfig,
    build_eval_backbone,
    eval_backbone_config,
)
from fm_transformers.eval.batches import make_batch

SMOKE_LENGTH = 96


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def smoke_config() -> TrainingConfig:
    """Three steps, two of them with dense CSA, on contexts of SMOKE_LENGTH tokens."""
    return TrainingConfig(
        size="smoke",
        steps=3,
        dense_steps=2,
        min_length=SMOKE_LENGTH,
        max_length=SMOKE_LENGTH,
        ramp_steps=0,
        tokens_per_step=2 * SMOKE_LENGTH,
        warmup_steps=1,
        precision="fp32",
    )


@pytest.fixture
def smoke_model():
    """A freshly initialized smoke-size backbone in train mode (seeded: every test sees the same weights)."""
    return build_eval_backbone(eval_backbone_config("smoke"), seed=0).train()


@pytest.fixture
def smoke_batch():
    """Two training rows (context, question and answer) of SMOKE_LENGTH-token contexts."""
    return make_batch(seed=0, step=0, context_length=SMOKE_LENGTH, batch_size=2)
