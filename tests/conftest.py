"""Shared fixtures: tiny DeepSeek-V4 models made in code, prompts, and stock-vs-LSA generation helpers."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fm_transformers as fm
from fm_transformers.tiny import TINY_VOCAB_SIZE, tiny_deepseek_v4

INDEXER_LAYERS = (2, 4)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The equivalence tests run on the CPU by default; FM_TEST_DEVICE=cuda runs them on a GPU.
DEVICE = torch.device(os.environ.get("FM_TEST_DEVICE", "cpu"))


def pytest_collection_modifyitems(config, items):
    """The one GPU switch of the suite: a test (or parameter) marked `gpu` is skipped when CUDA is missing."""
    if torch.cuda.is_available():
        return
    needs_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(needs_cuda)


@pytest.fixture(scope="session")
def load_example():
    """load_example("dir/script.py"): a script under examples/ as a module (the scripts are not a package), so a
    test can call its functions without a subprocess."""

    def load(relative: str):
        path = EXAMPLES / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def model():
    """The tiny model; its stock-cache runs prefill through the same bounded prefill as LSA
    (`enable_bounded_prefill`), so a stock run and an LSA run compute the prompt bit for bit alike and the
    tests below isolate what LSA changes in decode. tests/test_prefill.py compares that prefill with the
    stock eager one (`eager_model`)."""
    tiny = tiny_deepseek_v4(seed=0).to(DEVICE)
    fm.enable_bounded_prefill(tiny)
    return tiny


@pytest.fixture(scope="session")
def eager_model():
    """The same tiny model with transformers' own eager prefill for stock-cache runs."""
    return tiny_deepseek_v4(seed=0).to(DEVICE)


@pytest.fixture
def indexed_model(model):
    """The tiny model with a fresh (untrained) memory indexer on layers 2 and 4; detached afterwards."""
    torch.manual_seed(0)
    fm.attach_memory_indexer(model, fm.MemoryIndexerModel.from_backbone(model, layers=INDEXER_LAYERS, num_heads=8, rank=24))
    yield model
    fm.detach_memory_indexer(model)


def random_prompt(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, TINY_VOCAB_SIZE, (batch, length), generator=generator).to(DEVICE)


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (2, 45): a 45-token prompt beside a 30-token one left-padded with 15 zeros."""
    long_prompt, short_prompt = random_prompt(45, seed=1)[0], random_prompt(30, seed=2)[0]
    input_ids = torch.zeros(2, 45, dtype=torch.long, device=DEVICE)
    attention_mask = torch.zeros(2, 45, dtype=torch.long, device=DEVICE)
    input_ids[0], attention_mask[0] = long_prompt, 1
    input_ids[1, 15:], attention_mask[1, 15:] = short_prompt, 1
    return input_ids, attention_mask


def greedy(model, input_ids, max_new_tokens=24, **kwargs):
    return model.generate(
        input_ids,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
        **kwargs,
    )


def max_logit_difference(first, second) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first.logits, second.logits))


class LargestTensor(TorchDispatchMode):
    """Records the numel of the largest tensor any op creates while the mode is active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out
