"""Kernel tests run the Triton launchers natively on a GPU, or under the Triton interpreter on CPU.

TRITON_INTERPRET is read when `@triton.jit` runs, i.e. when triton and our kernel modules are imported, so it
is set here before the tests import them.
"""

import importlib
import importlib.util
import os
import sys

import pytest
import torch


def _let_the_interpreter_index_with_scalar_arguments() -> None:
    """Work around triton-lang/triton#9171 (fixed after triton 3.6): the interpreter turns a scalar argument
    into a one-element array and calls int() on it when it bounds a `range`, which numpy >= 2.4 refuses."""
    from triton.runtime import interpreter

    stock = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        stock(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor


def _import_triton_again_in_interpreter_mode() -> None:
    """Whatever imported triton before this file (transformers' DeepSeek-V4 modeling does) built its standard
    library, and any of our kernels, as compiled-only functions. Drop the Python side of triton and of our
    kernels so that the next import decorates them for the interpreter; the C extension stays loaded."""
    stale = [
        name
        for name in sys.modules
        if (name.split(".")[0] == "triton" and not name.startswith("triton._C"))
        or name.startswith("fm_transformers.kernels")
    ]
    for name in stale:
        del sys.modules[name]


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "triton" in sys.modules:
        _import_triton_again_in_interpreter_mode()
    if importlib.util.find_spec("triton") is not None:
        _let_the_interpreter_index_with_scalar_arguments()


@pytest.fixture
def device() -> str:
    """Small tests run where the kernels run natively if possible, else on CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator: inputs are random (never zeros) yet a failure reproduces."""
    return torch.Generator().manual_seed(0)
