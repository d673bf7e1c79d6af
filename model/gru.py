"""A multi-layer GRU stacked from our ``GRUCell`` modules, with a fast path for inference and training.

The cells hold the parameters and define the equations (see ``model.cell``). Running a sequence through
``GRUCell.forward`` step by step costs a dozen small Python-dispatched ops per step and layer; the fast
path below computes the same thing as:

1. the input projection of every step in one matmul per layer: ``(B, T, I) @ W_ih^T -> (B, T, 3H)``;
2. the recurrence of every layer in one TorchScript call (no per-step Python), six ops per step and layer:
   the hidden projection with its bias in one matmul (two for the seed variant, whose reset gate acts
   before ``W_hn``), the gates, and ``lerp`` for the update;
3. in sigmoid form: the state carried as (h + 1) / 2 and tanh computed as a rescaled sigmoid, the scales
   folded into the weights once (``sigmoid_form``), since torch's CPU tanh costs several times its sigmoid.

Sequences of unequal length run as one batch sorted longest first: at step t only the first
``batch_sizes[t]`` rows advance, so the batch shrinks as short chunks end and each row's final state is
its state after its own last step (the same scheme as ``torch.nn.utils.rnn.PackedSequence``).

On a GPU, at inference (no autograd), the whole forward runs instead as one fused Triton kernel launch
(``model.fused``), where six launches per step and layer would cost more than the arithmetic.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import fused
from model.cell import GRUCell, Variant
from model.derived import Derived, Weights


class SigmoidForm(NamedTuple):
    """What ``_run_layers`` takes: the folded weights and the constants of q = (h + 1) / 2 as 0-d tensors
    (a Python float is wrapped into a new tensor by every op that takes one, a microsecond or two each)."""

    weights: Weights  # the seed variant's W_hh transposed, (H, 3H): its two hidden products slice columns
    half: Tensor
    minus_one: Tensor


def sigmoid_form(weights: Weights, seed: bool) -> SigmoidForm:
    """The weights that let ``_run_layers`` compute this GRU on q = (h + 1) / 2 with no ``tanh``.

    tanh(a) = 2σ(2a) − 1 and lerp commutes with that affine map, so every factor of 2 and shift of −1 folds
    into the weights once and the recurrence needs no extra op per step; torch's CPU ``tanh`` costs several
    times its ``sigmoid``. Derivation: docs/model.md, "Sigmoid form"; the gain: docs/bench.md part 1.
    Differentiable: training folds on every call and gradients reach the cells' own parameters.
    """
    folded: Weights = ([], [], [], [])
    for layer, (w_ih, b_ih, w_hh, b_hh) in enumerate(zip(*weights, strict=True)):
        hidden = w_hh.size(1)
        if layer > 0:
            w_ih, b_ih = 2 * w_ih, b_ih - w_ih.sum(1)
        if seed:
            rz_shift = torch.cat([w_hh[: 2 * hidden].sum(1), w_hh.new_zeros(hidden)])
            b_ih = b_ih + b_hh - rz_shift
            w_hh, b_hh = torch.cat([2 * w_hh[: 2 * hidden], -w_hh[2 * hidden :]]), torch.zeros_like(b_hh)
        else:
            w_hh, b_hh = 2 * w_hh, b_hh - w_hh.sum(1)
        candidate_x2 = torch.ones_like(b_hh)
        candidate_x2[2 * hidden :] = 2.0
        w_hh = w_hh * candidate_x2[:, None]
        folded[0].append(w_ih * candidate_x2[:, None])
        folded[1].append(b_ih * candidate_x2)
        folded[2].append(w_hh.t().contiguous() if seed else w_hh)
        folded[3].append(b_hh * candidate_x2)
    first = weights[0][0]
    return SigmoidForm(folded, first.new_tensor(0.5), first.new_tensor(-1.0))


def _stack(tensors: list[Tensor], dim: int) -> Tensor:
    """``torch.stack``, but one tensor becomes a view: no copy for a one-step chunk or a one-layer GRU."""
    return tensors[0].unsqueeze(dim) if len(tensors) == 1 else torch.stack(tensors, dim)


def _running(
    q: Tensor, gx_rz: Tensor, gx_n: Tensor, t: int, active: int, full: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Step t's state and input projections (r and z, n) for the ``active`` rows of ``full`` still running,
    which (sorted longest first) are the first ones; views, never copies."""
    g_rz, g_n = gx_rz.select(1, t), gx_n.select(1, t)  # (B, 2H), (B, H)
    if active == full:
        return q, g_rz, g_n
    return q.narrow(0, 0, active), g_rz.narrow(0, 0, active), g_n.narrow(0, 0, active)


def _carry(q_new: Tensor, q: Tensor, active: int, full: int) -> Tensor:
    """The running rows' new states above the states of the rows whose chunk has ended, kept as they were."""
    return q_new if active == full else torch.cat([q_new, q.narrow(0, active, full - active)], 0)


def _run_layers(
    x: Tensor,
    h0: Tensor,
    weights_ih: list[Tensor],
    biases_ih: list[Tensor],
    weights_hh: list[Tensor],
    biases_hh: list[Tensor],
    half: Tensor,
    minus_one: Tensor,
    batch_sizes: list[int],
    seed: bool,
) -> tuple[Tensor, Tensor]:
    """Every layer over every step, in one TorchScript call: x (B, T, I), h0 (L, B, H) -> (B, T, H), (L, B, H).

    Takes a ``SigmoidForm`` and carries q = (h + 1) / 2: h0 goes in, and out and h_n come out, by one op
    each. Batch-major, the callers' layout (and the fused kernel's): nothing is transposed on the
    way in or out, and a step's slice of the input projection is B contiguous runs of 3H. Six ops per step
    and layer: the seed variant adds that step's slice of the input projection with ``addmm``; the torch
    variant keeps its hidden bias in ``linear`` (an ``addmm`` TorchScript would split into ``mm`` + ``add``,
    one pass more per step); ``lerp`` interpolates old state and candidate.
    """
    hidden = h0.size(2)
    full = x.size(0)
    layer_input = x
    finals: list[Tensor] = []
    q0 = torch.add(half, h0, alpha=0.5)
    for layer in range(len(weights_ih)):
        w_hh = weights_hh[layer]
        q = q0[layer]
        outs: list[Tensor] = []
        gx = F.linear(layer_input, weights_ih[layer], biases_ih[layer])  # (B, T, 3H)
        gx_rz, gx_n = gx.narrow(2, 0, 2 * hidden), gx.narrow(2, 2 * hidden, hidden)
        if seed:
            w_rz_t = w_hh.narrow(1, 0, 2 * hidden)  # (H, 2H): w_hh is transposed
            w_n_t = w_hh.narrow(1, 2 * hidden, hidden)  # (H, H)
            for t in range(gx.size(1)):
                active = batch_sizes[t]
                q_a, g_rz, g_n = _running(q, gx_rz, gx_n, t, active, full)
                rz = torch.addmm(g_rz, q_a, w_rz_t).sigmoid_()  # r, z gates
                r = rz.narrow(1, 0, hidden)
                s = torch.addmm(g_n, torch.addcmul(r, r, q_a, value=-2.0), w_n_t).sigmoid_()
                q = _carry(torch.lerp(q_a, s, rz.narrow(1, hidden, hidden)), q, active, full)  # z n + (1 − z) h
                outs.append(q)
        else:
            b_hh = biases_hh[layer]
            for t in range(gx.size(1)):
                active = batch_sizes[t]
                q_a, g_rz, g_n = _running(q, gx_rz, gx_n, t, active, full)
                gh = F.linear(q_a, w_hh, b_hh)  # (b, 3H); TorchScript would split an addmm into mm + add
                rz = torch.add(g_rz, gh.narrow(1, 0, 2 * hidden)).sigmoid_()  # r, z gates
                s = torch.addcmul(g_n, rz.narrow(1, 0, hidden), gh.narrow(1, 2 * hidden, hidden)).sigmoid_()
                q = _carry(torch.lerp(s, q_a, rz.narrow(1, hidden, hidden)), q, active, full)  # (1 − z) n + z h
                outs.append(q)
        layer_input = _stack(outs, 1)  # (B, T, H), in q: the next layer's weights expect it
        finals.append(q)
    return torch.add(minus_one, layer_input, alpha=2.0), torch.add(minus_one, _stack(finals, 0), alpha=2.0)


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
        self.register_load_state_dict_post_hook(GRU._weights_loaded)

    def _refresh_weights(self) -> None:
        # The per-layer parameter lists the scripted recurrence takes, gathered once (as nn.GRU keeps its
        # _flat_weights): collecting them on every call was a third of the fixed cost of a short chunk.
        cells = self.layers()
        self._weights: Weights = (
            [cell.weight_ih for cell in cells], [cell.bias_ih for cell in cells],
            [cell.weight_hh for cell in cells], [cell.bias_hh for cell in cells],
        )
        self._stacked = Derived(self._weights, fused.stack)
        self._sigmoid_form = Derived(self._weights, functools.partial(sigmoid_form, seed=self.variant == "seed"))

    @staticmethod
    def _weights_loaded(module: GRU, incompatible_keys: object) -> None:
        # load_state_dict(assign=True) replaces the parameters instead of copying into them.
        module._refresh_weights()

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
        step. Calling this chunk by chunk with the carried ``h_n`` equals one call on the whole sequence, to
        float32 rounding (the input projection's product is shaped by the chunk: about 1e-7 apart).
        """
        if x.dim() != 3 or x.size(2) != self.input_size or x.size(1) < 1:
            raise ValueError(f"x must be (B, T >= 1, {self.input_size}), got {tuple(x.shape)}")
        batch, steps, _ = x.shape
        if h0 is None:
            h0 = x.new_zeros(self.num_layers, batch, self.hidden_size)
        elif h0.shape != (self.num_layers, batch, self.hidden_size):  # the compiled loop would broadcast it
            raise ValueError(f"h0 must be (L, B, H) = {(self.num_layers, batch, self.hidden_size)},"
                             f" got {tuple(h0.shape)}")
        lens = None if lengths is None else checked_lengths(lengths, batch, steps)
        seed = self.variant == "seed"
        if self.use_fused and not torch.is_grad_enabled() and fused.supports(x):
            return fused.run_layers(x, h0, self._stacked.get(), lens, seed)
        # Training folds on every call, so gradients reach the cells' parameters.
        form = sigmoid_form(self._weights, seed) if torch.is_grad_enabled() else self._sigmoid_form.get()
        batch_sizes = [batch] * steps if lens is None else batch_sizes_for(lens, steps)
        return _run_layers_scripted(x, h0, *form.weights, form.half, form.minus_one, batch_sizes, seed)

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
