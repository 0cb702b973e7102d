"""Which backend runs an op: the Triton kernel or the torch reference.

Every op in this package has a pure-torch reference, so the package must import (and the references must
work) on machines without triton. When triton is missing, `triton` and `tl` below are a stand-in that lets
the `@triton.jit` definitions and their `tl.constexpr` annotations load; the launchers refuse to run.
"""

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _TritonMissing:
        """Stands in for `triton` and `triton.language` so that kernel definitions still import."""

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _TritonMissing()


def runs_triton(tensor: torch.Tensor) -> bool:
    """True when the public op should launch its kernel: triton is there and the data is on a GPU.

    CPU tensors always take the reference, even under TRITON_INTERPRET (the interpreter is for testing the
    kernels, which the tests do by calling the `*_triton` launchers directly).
    """
    return HAS_TRITON and tensor.is_cuda


def require_triton(op: str) -> None:
    """Raise a helpful error when a Triton launcher is called without triton installed."""
    if not HAS_TRITON:
        raise ImportError(f"{op}_triton needs triton: `pip install triton`, or call {op}_reference instead")


def block_size(n: int, minimum: int = 16) -> int:
    """Power-of-two tile covering `n`, at least `minimum` (tl.dot needs every dimension >= 16)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())
