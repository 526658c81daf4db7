"""Backend choice for the fused kernels: compiled Triton on CUDA, the torch twin elsewhere, the interpreter on request.

Rule (`use_triton(t)`), driven by the environment variable ``RFPO_KERNEL_BACKEND``:

- ``auto`` (default): Triton when the tensor is on a CUDA device and triton imports; the torch twin otherwise.
- ``torch``: always the torch twin.
- ``triton``: always Triton. On a CPU tensor this runs Triton's interpreter and therefore needs
  ``TRITON_INTERPRET=1`` in the environment *before* the first kernel launch (the tests set both).

Kernels are written as plain Python functions and jitted lazily (`jit(fn)`), so the interpreter/compiler
choice is made at first launch, not at import time.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

BACKEND_ENV = "RFPO_KERNEL_BACKEND"
_VALID = ("auto", "torch", "triton")


def triton_available() -> bool:
    """True when `import triton` works."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def interpret_mode() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def backend_setting() -> str:
    """The requested backend from RFPO_KERNEL_BACKEND (auto|torch|triton)."""
    val = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if val not in _VALID:
        raise ValueError(f"{BACKEND_ENV}={val!r} is not one of {_VALID}; unset it or pick one of those")
    return val


def use_triton(t: torch.Tensor) -> bool:
    """Whether the kernels should run the Triton path for tensor `t` (see module docstring)."""
    setting = backend_setting()
    if setting == "torch":
        return False
    if setting == "auto":
        return t.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not importable; pip install triton or unset {BACKEND_ENV}")
    if not t.is_cuda and not interpret_mode():
        raise RuntimeError(
            f"{BACKEND_ENV}=triton on a CPU tensor needs TRITON_INTERPRET=1 in the environment "
            f"(Triton's interpreter); set it or use {BACKEND_ENV}=torch"
        )
    return True


_JIT_CACHE: dict[tuple[Callable, bool], Callable] = {}


def jit(fn: Callable) -> Callable:
    """`triton.jit(fn)`, built at first use and cached per interpreter mode."""
    key = (fn, interpret_mode())
    k = _JIT_CACHE.get(key)
    if k is None:
        import triton

        k = triton.jit(fn)
        _JIT_CACHE[key] = k
    return k
