"""A multi-layer GRU stacked from our ``GRUCell`` modules, with a fast path for inference and training.

The cells hold the parameters and define the equations (see ``model.cell``). Running a sequence through
``GRUCell.forward`` step by step costs a dozen small Python-dispatched ops per step and layer; the fast
path below computes the same thing as:

1. the input projection of every step in one matmul per layer: ``(B, T, I) @ W_ih^T -> (B, T, 3H)``;
2. the recurrence of every layer in one TorchScript call (no per-step Python), six ops per step and layer:
   the hidden projection with its bias in one matmul (two for the seed variant, whose reset gate acts
   before ``W_hn``), the gates, and ``lerp`` for the update.

Sequences of unequal length run as one batch sorted longest first: at step t only the first
``batch_sizes[t]`` rows advance, so the batch shrinks as short chunks end and each row's final state is
its state after its own last step (the same scheme as ``torch.nn.utils.rnn.PackedSequence``).

On a GPU, at inference (no autograd), the whole forward runs instead as one fused Triton kernel launch
(``model.fused``), where six launches per step and layer would cost more than the arithmetic.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import fused
from model.cell import GRUCell, Variant


def _run_layers(
    x: Tensor,
    h0: Tensor,
    weights_ih: list[Tensor],
    biases_ih: list[Tensor],
    weights_hh: list[Tensor],
    biases_hh: list[Tensor],
    batch_sizes: list[int],
    seed: bool,
) -> tuple[Tensor, Tensor]:
    """Every layer over every step, in one TorchScript call: x (B, T, I), h0 (L, B, H) -> (B, T, H), (L, B, H).

    Batch-major, the callers' layout (and the fused kernel's): nothing is transposed on the way in or out,
    and a step's slice of the input projection is B contiguous runs of 3H. Six ops per step and layer: the
    seed variant folds every hidden bias into the input projection once per chunk and adds that step's
    slice with ``addmm``; the torch variant keeps its hidden bias in ``linear`` (an ``addmm`` TorchScript
    would split into ``mm`` + ``add``, one pass more per step); ``lerp`` interpolates old state and candidate.
    """
    hidden = h0.size(2)
    full = x.size(0)
    layer_input = x
    finals: list[Tensor] = []
    for layer in range(len(weights_ih)):
        w_hh = weights_hh[layer]
        b_hh = biases_hh[layer]
        h = h0[layer]
        outs: list[Tensor] = []
        if seed:
            # every b_h* is outside the reset gate: W_hn (r ⊙ h) + b_hn
            gx = F.linear(layer_input, weights_ih[layer], biases_ih[layer] + b_hh)  # (B, T, 3H)
            w_rz_t = w_hh[: 2 * hidden].t()  # (H, 2H)
            w_n_t = w_hh[2 * hidden :].t()  # (H, H)
            for t in range(gx.size(1)):
                active = batch_sizes[t]
                h_a = h if active == full else h[:active]
                g = gx[:, t] if active == full else gx[:active, t]  # (b, 3H)
                rz = torch.addmm(g[:, : 2 * hidden], h_a, w_rz_t).sigmoid_()  # r, z gates
                n = torch.addmm(g[:, 2 * hidden :], rz[:, :hidden] * h_a, w_n_t).tanh_()  # candidate
                h_new = torch.lerp(h_a, n, rz[:, hidden:])  # z ⊙ n + (1 − z) ⊙ h
                h = h_new if active == full else torch.cat([h_new, h[active:]], 0)
                outs.append(h)
        else:
            # b_hn sits inside the reset gate, r ⊙ (W_hn h + b_hn): it stays with the hidden projection
            gx = F.linear(layer_input, weights_ih[layer], biases_ih[layer])  # (B, T, 3H)
            for t in range(gx.size(1)):
                active = batch_sizes[t]
                h_a = h if active == full else h[:active]
                g = gx[:, t] if active == full else gx[:active, t]  # (b, 3H)
                gh = F.linear(h_a, w_hh, b_hh)  # (b, 3H); TorchScript would split an addmm into mm + add
                rz = (g[:, : 2 * hidden] + gh[:, : 2 * hidden]).sigmoid_()  # r, z gates
                n = torch.addcmul(g[:, 2 * hidden :], rz[:, :hidden], gh[:, 2 * hidden :]).tanh_()
                h_new = torch.lerp(n, h_a, rz[:, hidden:])  # (1 − z) ⊙ n + z ⊙ h
                h = h_new if active == full else torch.cat([h_new, h[active:]], 0)
                outs.append(h)
        layer_input = torch.stack(outs, 1)  # (B, T, H)
        finals.append(h)
    return layer_input, torch.stack(finals, 0)


with warnings.catch_warnings():
    # TorchScript is deprecated in favour of torch.compile, but it compiles in milliseconds, needs no C++
    # toolchain at run time and never recompiles for a new batch shape: what a server wants.
    warnings.simplefilter("ignore", DeprecationWarning)
    _run_layers_scripted = torch.jit.script(_run_layers)


def checked_lengths(lengths: Tensor | list[int], batch: int, steps: int) -> list[int]:
    """Each row's steps, sorted longest first and within 1..steps."""
    lens = [int(n) for n in lengths]
    if len(lens) != batch or any(a < b for a, b in itertools.pairwise(lens)):
        raise ValueError(f"lengths must hold {batch} values sorted longest first, got {lens}")
    if lens and (lens[0] > steps or lens[-1] < 1):
        raise ValueError(f"lengths must lie in 1..{steps}, got {lens}")
    return lens


def batch_sizes_for(lengths: list[int], steps: int) -> list[int]:
    """Rows still running at each step, for lengths sorted longest first."""
    return [sum(1 for n in lengths if n > t) for t in range(steps)]


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
        # False keeps CUDA inputs on the TorchScript path too (for comparisons and benchmarks).
        self.use_fused = True
        self._refresh_weights()

    def _refresh_weights(self) -> None:
        # The per-layer parameter lists the scripted recurrence takes, gathered once (as nn.GRU keeps its
        # _flat_weights): collecting them on every call was a third of the fixed cost of a short chunk.
        cells = self.layers()
        self._weights: fused.Weights = (
            [cell.weight_ih for cell in cells], [cell.bias_ih for cell in cells],
            [cell.weight_hh for cell in cells], [cell.bias_hh for cell in cells],
        )
        self._stack = fused.Stack(self._weights)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GRU:
        # .to(), .cuda(), .half() may give the parameters new tensors: gather them again.
        result = super()._apply(fn, recurse)
        self._refresh_weights()
        return result

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
        lens = None if lengths is None else checked_lengths(lengths, batch, steps)
        if self.use_fused and not torch.is_grad_enabled() and fused.supports(x):
            return fused.run_layers(x, h0, self._stack, lens, self.variant == "seed")
        weights_ih, biases_ih, weights_hh, biases_hh = self._weights
        return _run_layers_scripted(
            x,
            h0,
            weights_ih,
            biases_ih,
            weights_hh,
            biases_hh,
            [batch] * steps if lens is None else batch_sizes_for(lens, steps),
            self.variant == "seed",
        )

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
