"""A multi-layer GRU stacked from our ``GRUCell`` modules, with a fast path for inference and training.

The cells hold the parameters and define the equations (see ``model.cell``). Running a sequence through
``GRUCell.forward`` step by step costs a dozen small Python-dispatched ops per step and layer; the fast
path below computes the same thing as:

1. the input projection of every step in one matmul per layer: ``(B, T, I) @ W_ih^T -> (B, T, 3H)``;
2. the recurrence in a TorchScript loop (no per-step Python), one ``addmm`` per step for the hidden
   projection (two for the seed variant, whose reset gate acts before ``W_hn``).

Sequences of unequal length run as one batch sorted longest first: at step t only the first
``batch_sizes[t]`` rows advance, so the batch shrinks as short chunks end and each row's final state is
its state after its own last step (the same scheme as ``torch.nn.utils.rnn.PackedSequence``).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.cell import GRUCell, Variant


def _seed_recurrence(
    gx: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor, batch_sizes: list[int]
) -> tuple[Tensor, Tensor]:
    """Seed equations over time: gx (B, T, 3H) input projections, h (B, H) -> out (B, T, H), h_T (B, H)."""
    hidden = h.size(1)
    w_rz_t = w_hh[: 2 * hidden].t()  # (H, 2H)
    w_n_t = w_hh[2 * hidden :].t()  # (H, H)
    b_rz = b_hh[: 2 * hidden]
    b_n = b_hh[2 * hidden :]
    outs: list[Tensor] = []
    full = h.size(0)
    for t in range(gx.size(1)):
        active = batch_sizes[t]
        h_a = h[:active]
        g = gx[:active, t]  # (b, 3H)
        rz = torch.sigmoid(g[:, : 2 * hidden] + torch.addmm(b_rz, h_a, w_rz_t))  # (b, 2H)
        r = rz[:, :hidden]
        z = rz[:, hidden:]
        n = torch.tanh(g[:, 2 * hidden :] + torch.addmm(b_n, r * h_a, w_n_t))  # (b, H)
        h_new = h_a + z * (n - h_a)  # = z ⊙ n + (1 − z) ⊙ h
        h = h_new if active == full else torch.cat([h_new, h[active:]], 0)
        outs.append(h)
    return torch.stack(outs, 1), h


def _torch_recurrence(
    gx: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor, batch_sizes: list[int]
) -> tuple[Tensor, Tensor]:
    """PyTorch/cuDNN equations over time; same shapes as ``_seed_recurrence``."""
    hidden = h.size(1)
    w_hh_t = w_hh.t()  # (H, 3H)
    outs: list[Tensor] = []
    full = h.size(0)
    for t in range(gx.size(1)):
        active = batch_sizes[t]
        h_a = h[:active]
        g = gx[:active, t]  # (b, 3H)
        gh = torch.addmm(b_hh, h_a, w_hh_t)  # (b, 3H)
        rz = torch.sigmoid(g[:, : 2 * hidden] + gh[:, : 2 * hidden])
        r = rz[:, :hidden]
        z = rz[:, hidden:]
        n = torch.tanh(g[:, 2 * hidden :] + r * gh[:, 2 * hidden :])
        h_new = n + z * (h_a - n)  # = (1 − z) ⊙ n + z ⊙ h
        h = h_new if active == full else torch.cat([h_new, h[active:]], 0)
        outs.append(h)
    return torch.stack(outs, 1), h


Recurrence = Callable[[Tensor, Tensor, Tensor, Tensor, list[int]], tuple[Tensor, Tensor]]


def _script(fn: Recurrence) -> Recurrence:
    # TorchScript is deprecated in favour of torch.compile, but it compiles in milliseconds, needs no C++
    # toolchain at run time and never recompiles for a new batch shape: what a server wants.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(fn)


_RECURRENCES = {"seed": _script(_seed_recurrence), "torch": _script(_torch_recurrence)}


def batch_sizes_for(lengths: Tensor | list[int] | None, batch: int, steps: int) -> list[int]:
    """Rows still running at each step, for lengths sorted longest first (all ``steps`` when None)."""
    if lengths is None:
        return [batch] * steps
    lens = [int(n) for n in lengths]
    if len(lens) != batch or any(a < b for a, b in itertools.pairwise(lens)):
        raise ValueError(f"lengths must hold {batch} values sorted longest first, got {lens}")
    if lens and (lens[0] > steps or lens[-1] < 1):
        raise ValueError(f"lengths must lie in 1..{steps}, got {lens}")
    return [sum(1 for n in lens if n > t) for t in range(steps)]


class GRU(nn.Module):
    """``num_layers`` GRUCells over time: forward(x (B, T, I), h0 (L, B, H) | None) -> (out (B, T, H), h_n)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, variant: Variant = "seed"):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.variant: Variant = variant
        self.cells = nn.ModuleList(
            GRUCell(input_size if layer == 0 else hidden_size, hidden_size, variant=variant)
            for layer in range(num_layers)
        )

    def forward(
        self, x: Tensor, h0: Tensor | None = None, lengths: Tensor | list[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Run every layer over the whole chunk; ``lengths`` (sorted longest first) for unequal rows.

        Outputs past a row's length are placeholders; ``h_n`` holds each row's state after its own last
        step. Calling this chunk by chunk with the carried ``h_n`` equals one call on the whole sequence.
        """
        batch, steps, _ = x.shape
        if h0 is None:
            h0 = x.new_zeros(self.num_layers, batch, self.hidden_size)
        sizes = batch_sizes_for(lengths, batch, steps)
        recurrence = _RECURRENCES[self.variant]
        layer_input = x
        finals = []
        for layer, cell in enumerate(self.layers()):
            gx = F.linear(layer_input, cell.weight_ih, cell.bias_ih)  # (B, T, 3H), all steps in one matmul
            layer_input, h_last = recurrence(gx, h0[layer], cell.weight_hh, cell.bias_hh, sizes)
            finals.append(h_last)
        return layer_input, torch.stack(finals)  # (B, T, H), (L, B, H)

    def layers(self) -> list[GRUCell]:
        """The cells, bottom layer first."""
        return [cell for cell in self.cells if isinstance(cell, GRUCell)]

    @classmethod
    def from_torch(cls, reference: nn.GRU) -> GRU:
        """Import the weights of a ``torch.nn.GRU`` into the ``"torch"`` variant, which computes the same."""
        if reference.bidirectional or reference.proj_size:
            raise ValueError("only unidirectional nn.GRU without projections can be imported")
        gru = cls(reference.input_size, reference.hidden_size, reference.num_layers, variant="torch")
        first = reference.all_weights[0][0]
        gru.to(device=first.device, dtype=first.dtype)
        with torch.no_grad():
            for layer, cell in enumerate(gru.layers()):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    source = getattr(reference, f"{name}_l{layer}", None)
                    target = getattr(cell, name)
                    if source is None:  # bias=False: the zeros stay and never train
                        target.zero_()
                        target.requires_grad_(False)
                    else:
                        target.copy_(source)
        return gru
