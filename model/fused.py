"""The GRU recurrence as one Triton kernel per layer: the GPU path of ``model.gru.GRU`` at inference.

On a GPU the TorchScript recurrence launches six small kernels per step and layer, and at serving sizes
(H = 64, B ≤ 256) each costs more in launch latency than in arithmetic: cuDNN's ``nn.GRU`` wins by fusing.
Here one kernel runs a layer's whole chunk. Each program owns one row of the batch (so B = 256 fills the
GPU's 132 multiprocessors twice), holds the three H × H blocks of W_hh in registers and the row's hidden
state across all T steps, and per step does the three hidden projections as broadcast-multiply-and-sum in
fp32 FMA (so results match the TorchScript path to 1e-5; TF32 tensor cores would not) and the gates in
place. The input projection of every step stays outside, one cuBLAS matmul per layer, biases folded in.
A first version gave each program 16 rows and used ``tl.dot``: the operand layouts of the weights spilled
registers and it ran 5x slower than cuDNN at B = 256 (see docs/bench.md).

Rows of unequal length need no sorting or shrinking: a row whose chunk has ended keeps its state
(``tl.where`` on ``t < length``), which is what the shrinking batch of the TorchScript path computes.

Triton ships with CUDA builds of torch on Linux; where it is missing (CPU wheels, macOS), ``AVAILABLE`` is
False and the GRU keeps its TorchScript path. ``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors,
which is how the test suite checks it on machines without a GPU.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the TorchScript path serves
    AVAILABLE = False
else:
    AVAILABLE = True

Weights = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]  # per layer: W_ih, b_ih, W_hh, b_hh


if AVAILABLE:

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _tanh(x):
        # 2σ(2x) − 1 with the exponent of a non-positive number only: exact in fp32 to ~1e-7, never overflows
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x >= 0, t, -t)

    # No specialising on the chunk length (Triton's default recompiles for 1 and multiples of 16): one
    # compiled kernel per model serves every chunk; the batch size is only the grid.
    @triton.jit(do_not_specialize=["steps"])
    def _layer_kernel(
        gx_ptr,  # (B, T, 3H) input projection, b_ih included
        h0_ptr,  # (B, H)
        w_hh_ptr,  # (3H, H), gate order r, z, n
        b_hh_ptr,  # (3H,)
        lengths_ptr,  # (B,) int32 steps per row, read only when RAGGED
        out_ptr,  # (B, T, H)
        h_n_ptr,  # (B, H)
        steps,
        HIDDEN: tl.constexpr,
        HIDDEN_P2: tl.constexpr,  # HIDDEN rounded up to a power of two: padded lanes stay zero
        SEED: tl.constexpr,
        RAGGED: tl.constexpr,  # rows of unequal length (else every row runs all steps)
    ):
        row = tl.program_id(0).to(tl.int64)  # offsets reach B · T · 3H, past int32 for long chunks
        j = tl.arange(0, HIDDEN_P2)  # output unit
        k = tl.arange(0, HIDDEN_P2)  # input unit
        j_ok = j < HIDDEN
        w_ok = j_ok[:, None] & (k < HIDDEN)[None, :]
        w = w_hh_ptr + j[:, None] * HIDDEN + k[None, :]  # (HP, HP): W[gate * H + j, k]
        w_r = tl.load(w, mask=w_ok, other=0.0)
        w_z = tl.load(w + HIDDEN * HIDDEN, mask=w_ok, other=0.0)
        w_n = tl.load(w + 2 * HIDDEN * HIDDEN, mask=w_ok, other=0.0)
        b_hr = tl.load(b_hh_ptr + j, mask=j_ok, other=0.0)
        b_hz = tl.load(b_hh_ptr + HIDDEN + j, mask=j_ok, other=0.0)
        b_hn = tl.load(b_hh_ptr + 2 * HIDDEN + j, mask=j_ok, other=0.0)

        h = tl.load(h0_ptr + row * HIDDEN + j, mask=j_ok, other=0.0)
        length = tl.load(lengths_ptr + row) if RAGGED else steps
        t = 0
        while t < steps:  # a while loop: Triton's interpreter cannot range() over a runtime scalar
            g = gx_ptr + (row * steps + t) * (3 * HIDDEN) + j
            x_r = tl.load(g, mask=j_ok, other=0.0) + b_hr  # issued first: nothing waits on them until the gates
            x_z = tl.load(g + HIDDEN, mask=j_ok, other=0.0) + b_hz
            x_n = tl.load(g + 2 * HIDDEN, mask=j_ok, other=0.0)
            r = _sigmoid(x_r + tl.sum(w_r * h[None, :], axis=1))
            z = _sigmoid(x_z + tl.sum(w_z * h[None, :], axis=1))
            if SEED:
                n = _tanh(x_n + b_hn + tl.sum(w_n * (r * h)[None, :], axis=1))
                h_new = h + z * (n - h)  # z ⊙ n + (1 − z) ⊙ h
            else:
                n = _tanh(x_n + r * (tl.sum(w_n * h[None, :], axis=1) + b_hn))
                h_new = n + z * (h - n)  # (1 − z) ⊙ n + z ⊙ h
            h = tl.where(t < length, h_new, h)  # an ended row keeps its state
            tl.store(out_ptr + (row * steps + t) * HIDDEN + j, h, mask=j_ok)
            t += 1
        tl.store(h_n_ptr + row * HIDDEN + j, h, mask=j_ok)


def num_warps(hidden_p2: int) -> int:
    """Warps per program. On an H200 (1 to 16 tried, docs/bench.md part 4) no count won everywhere: at
    H = 64, 16 warps was fastest at 3 of 9 shapes and 2.4x slower at another; 4 was never more than 1.7x
    off the best and fastest at H = 128. Above H = 128, 8, so the weight blocks spill less (not measured)."""
    return 4 if hidden_p2 <= 128 else 8


def supports(x: Tensor) -> bool:
    """Whether the GRU should run this input here: Triton present, fp32, on CUDA."""
    return AVAILABLE and x.is_cuda and x.dtype == torch.float32


def run_layers(
    x: Tensor,
    h0: Tensor,
    weights: Weights,
    lengths: list[int] | None,
    seed: bool,
) -> tuple[Tensor, Tensor]:
    """Every layer over every step: x (B, T, I), h0 (L, B, H) -> (B, T, H), (L, B, H).

    ``model.gru._run_layers``'s contract; ``lengths`` in any order, or None when every row runs all T steps.
    Two launches per layer: the input projection (cuBLAS) and the recurrence.
    """
    weights_ih, biases_ih, weights_hh, biases_hh = weights
    batch, steps, _ = x.shape
    hidden = h0.size(2)
    if batch == 0:
        return x.new_empty(0, steps, hidden), h0.new_empty(h0.shape)
    padded = triton.next_power_of_2(hidden)
    ragged = lengths is not None and min(lengths) < steps
    # Only ragged batches pay for the copy to the device; others pass a placeholder the kernel never reads.
    steps_per_row = torch.tensor(lengths, dtype=torch.int32).to(x.device) if ragged else h0
    h0 = h0.contiguous()
    layer_input = x
    h_n = torch.empty_like(h0)
    # Triton launches on the current CUDA device: make it x's (a no-op for the service, which uses one).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        for layer, (w_ih, b_ih, w_hh, b_hh) in enumerate(
            zip(weights_ih, biases_ih, weights_hh, biases_hh, strict=True)
        ):
            gx = F.linear(layer_input, w_ih, b_ih).contiguous()  # (B, T, 3H)
            out = x.new_empty(batch, steps, hidden)
            _layer_kernel[(batch,)](
                gx, h0[layer], w_hh.contiguous(), b_hh, steps_per_row, out, h_n[layer], steps,
                HIDDEN=hidden, HIDDEN_P2=padded, SEED=seed, RAGGED=ragged, num_warps=num_warps(padded),
            )
            layer_input = out
    return layer_input, h_n
