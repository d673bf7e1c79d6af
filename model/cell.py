"""A gated recurrent unit cell, written out from its equations.

Two formulations share one parameter layout (rows in gate order r, z, n, exactly as ``torch.nn.GRUCell``):

``variant="seed"`` -- Cho et al. 2014, "Learning Phrase Representations using RNN Encoder-Decoder for
Statistical Machine Translation", eq. 5-8, where the reset gate acts on the state before its projection:

    r  = σ(W_ir x + b_ir + W_hr h + b_hr)
    z  = σ(W_iz x + b_iz + W_hz h + b_hz)
    n  = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn)
    h' = z ⊙ n + (1 − z) ⊙ h

``variant="torch"`` -- the ``torch.nn.GRU`` / cuDNN formulation (PyTorch docs, ``torch.nn.GRU``), where the
reset gate acts after the projection and z keeps the old state; weights trained with ``nn.GRU`` load exactly:

    n  = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h' = (1 − z) ⊙ n + z ⊙ h
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Variant = Literal["seed", "torch"]
VARIANTS: tuple[Variant, ...] = ("seed", "torch")


class GRUCell(nn.Module):
    """One GRU step; the stacked ``GRU`` runs the same equations over time without per-step Python."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, variant: Variant = "seed"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.variant: Variant = variant
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        # Without bias the zeros still take part, so both variants keep one code path.
        self.bias_ih = nn.Parameter(torch.zeros(3 * hidden_size), requires_grad=bias)
        self.bias_hh = nn.Parameter(torch.zeros(3 * hidden_size), requires_grad=bias)
        self.reset_parameters(bias)

    def reset_parameters(self, bias: bool = True) -> None:
        """U(-1/√H, 1/√H) for every parameter, as torch.nn.GRUCell does."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, param in self.named_parameters():
            if name.startswith("bias") and not bias:
                nn.init.zeros_(param)
            else:
                nn.init.uniform_(param, -bound, bound)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """One step (see module docstring for the equations): x (B, I), h (B, H) -> h' (B, H)."""
        x_r, x_z, x_n = F.linear(x, self.weight_ih, self.bias_ih).chunk(3, dim=-1)  # (B, H) each
        W_hr, W_hz, W_hn = self.weight_hh.chunk(3, dim=0)
        b_hr, b_hz, b_hn = self.bias_hh.chunk(3)
        r = torch.sigmoid(x_r + F.linear(h, W_hr, b_hr))  # reset gate
        z = torch.sigmoid(x_z + F.linear(h, W_hz, b_hz))  # update gate
        if self.variant == "seed":
            n = torch.tanh(x_n + F.linear(r * h, W_hn, b_hn))  # candidate state
            return z * n + (1 - z) * h
        n = torch.tanh(x_n + r * F.linear(h, W_hn, b_hn))
        return (1 - z) * n + z * h

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, variant={self.variant!r}"
