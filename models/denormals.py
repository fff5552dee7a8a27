"""Flush denormal floats in every thread that computes.

On some CPUs the backward pass of a transformer runs into denormal (subnormal) floats, and
every operation on them is slow: the BLIP-base gradient took 17.9 s instead of 1.8 s on one of
this project's machines. Flushing them to zero changes results only below float32's smallest
normal number (1.2e-38).

The flag lives in a CPU register of each thread, and ``torch.set_flush_denormal`` sets it for
the calling thread alone. Two kinds of thread compute here: every Streamlit session runs in a
thread of its own, and each of those hands parts of every large operation to OpenMP worker
threads of its own, which keep whatever state they were created with (measured: after switching
the calling thread only, half of a two-thread multiplication was still denormal). So the flag is
set at the start of each explainer call, in the calling thread and, through one OpenMP parallel
region, in each of its worker threads.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch

Result = TypeVar("Result")
_REGION_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class FlushesDenormals(Protocol):
    flush_denormals: bool


@functools.cache
def _openmp_parallel():
    """libgomp's ``GOMP_parallel`` as loaded by torch, or None where torch uses no libgomp."""
    try:
        parallel = ctypes.CDLL(None).GOMP_parallel
    except AttributeError:
        return None
    parallel.argtypes = [_REGION_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    return parallel


def set_flush_denormal_everywhere(on: bool) -> None:
    """Flush denormals (or stop) in this thread and in the intra-op threads it runs torch ops on."""
    torch.set_flush_denormal(on)
    parallel = _openmp_parallel()
    if parallel is None or torch.get_num_threads() == 1:
        return
    # The same OpenMP runtime keeps one team of worker threads per calling thread and reuses it,
    # so a region of torch's thread count reaches the workers torch's own operations run on.
    body = _REGION_BODY(lambda _: torch.set_flush_denormal(on))
    parallel(body, None, torch.get_num_threads(), 0)


def in_denormal_mode(method: Callable[..., Result]) -> Callable[..., Result]:
    """Decorate an explainer method: run it with denormal flushing set to the explainer's
    ``flush_denormals`` (True unless a benchmark measures what flushing saves)."""

    @functools.wraps(method)
    def wrapper(self: FlushesDenormals, *args, **kwargs) -> Result:
        set_flush_denormal_everywhere(self.flush_denormals)
        return method(self, *args, **kwargs)

    return wrapper
