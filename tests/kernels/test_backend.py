"""Dispatch of the public ops: kernels on CUDA tensors, references elsewhere, and no hard need for triton."""

import subprocess
import sys

import torch

from fm_transformers.kernels import (
    gather_chunks,
    level1_scores,
    level1_scores_reference,
    level2_topk,
    level2_topk_reference,
    sparse_decode_attention,
    sparse_decode_attention_reference,
)


def test_public_ops_on_cpu_tensors_run_their_reference(gen):
    q, w = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, generator=gen)
    keys = torch.randn(2, 9, 8, generator=gen)
    valid = torch.tensor([9, 4])
    assert torch.equal(level1_scores(q, w, keys, valid), level1_scores_reference(q, w, keys, valid))

    cand = torch.tensor([[0, 5, -1], [7, 2, 3]])
    got, want = (
        level2_topk(q, w, keys[0], cand, None, 2, 0.3),
        level2_topk_reference(q, w, keys[0], cand, None, 2, 0.3),
    )
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))

    args = (q, keys, torch.zeros(2, 9), keys[1], cand, torch.randn(3, generator=gen), 0.3)
    assert torch.equal(sparse_decode_attention(*args), sparse_decode_attention_reference(*args))

    dst = torch.randn(4, 8, generator=gen)
    gather_chunks(keys[0], torch.tensor([8, 1]), dst, torch.tensor([3, 0]))
    assert torch.equal(dst[[3, 0]], keys[0, [8, 1]])


def test_kernels_import_and_run_their_references_without_triton():
    script = (
        "import sys, torch; sys.modules['triton'] = None\n"
        "import fm_transformers.kernels as k\n"
        "assert not k.HAS_TRITON\n"
        "q, w, keys = torch.randn(1, 2, 4), torch.randn(1, 2), torch.randn(1, 5, 4)\n"
        "assert k.level1_scores(q, w, keys, torch.tensor([5])).shape == (1, 5)\n"
        "try:\n"
        "    k.level1_scores_triton(q, w, keys, torch.tensor([5]))\n"
        "except ImportError as e:\n"
        "    assert 'pip install triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('the launcher ran without triton')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
