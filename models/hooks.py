"""Per-call capture of module outputs on a model that many threads share."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def capture_outputs(modules: Sequence[nn.Module], output_index: int = 0) -> Iterator[list[torch.Tensor | None]]:
    """Record what each module returns during the forward passes run inside the block.

    Hooks exist only for the duration of the ``with`` block and are removed even when the
    block raises. A cached model serves every browser session, each in its own thread, so a
    hook only records forward passes of the thread that opened the block: another session's
    forward pass through the same module is ignored.

    Args:
        modules: the modules to watch.
        output_index: which element to keep when a module returns a tuple (transformers
            layers return a tensor or a tuple, depending on the model and version).
    Yields:
        A list with one slot per module, filled with the module's first output tensor in
        the block (BLIP's final LayerNorm runs twice, on all tokens and then on the pooled
        token: the first call is the one the decoder reads).
    """
    owner_thread = threading.get_ident()
    captured: list[torch.Tensor | None] = [None] * len(modules)
    handles = []

    def make_hook(slot: int):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            if threading.get_ident() != owner_thread or captured[slot] is not None:
                return
            captured[slot] = output[output_index] if isinstance(output, tuple) else output

        return hook

    try:
        for slot, module in enumerate(modules):
            handles.append(module.register_forward_hook(make_hook(slot)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
