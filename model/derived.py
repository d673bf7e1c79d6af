"""Tensors computed from a GRU's parameters once and kept until a parameter changes.

The fast paths read the weights rearranged (stacked per kind for the fused kernel, rescaled for the
sigmoid-form recurrence); doing that on every call would add several small ops to every chunk. A
parameter changed in place (``load_state_dict``, an optimiser step) bumps its ``_version``; one replaced
(``.to()``) has a new ``data_ptr``: either makes the kept tensors stale. Parameters made under
``torch.inference_mode`` have no ``_version``, so nothing built from them is kept. One change goes unseen:
a write through ``param.data`` (``p.data.mul_(2)``), a tensor with a version counter of its own; change
parameters under ``torch.no_grad()`` instead, as optimisers and ``load_state_dict`` do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import Tensor

Weights = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]  # per layer: W_ih, b_ih, W_hh, b_hh
T = TypeVar("T")


class Derived(Generic[T]):
    """``build(weights)``, computed without autograd and made again only when a parameter changed."""

    def __init__(self, weights: Weights, build: Callable[[Weights], T]):
        self.weights = weights
        self._parameters = [w for kind in weights for w in kind]
        self._build = build
        self._key: list[tuple[int, int]] = []
        self._value: T | None = None

    def get(self) -> T:
        try:
            key = [(w.data_ptr(), w._version) for w in self._parameters]
        except RuntimeError:  # inference tensors: an in-place change would go unseen, so build every time
            with torch.no_grad():
                return self._build(self.weights)
        if self._value is None or key != self._key:
            with torch.no_grad():
                self._value = self._build(self.weights)
            self._key = key
        return self._value
