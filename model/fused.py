"""The GRU recurrence as one Triton kernel per layer: the GPU path of ``model.gru.GRU`` at inference.

On a GPU the TorchScript recurrence launches six small kernels per step and layer, and at serving sizes
(H = 64, B ≤ 256) each costs more in launch latency than in arithmetic: cuDNN's ``nn.GRU`` wins by fusing.
Here one kernel runs a layer's whole chunk. Each program owns ``BLOCK_B`` rows of the batch, keeps their
hidden state in registers across all T steps, and per step does the three hidden projections with
``tl.dot`` (IEEE fp32, so results match the TorchScript path to 1e-5; TF32 would not) and the gates in
place. The input projection of every step stays outside, one cuBLAS matmul per layer, biases folded in.

Rows of unequal length need no sorting or shrinking: a row whose chunk has ended keeps its state
(``tl.where`` on ``t < length``), which is what the shrinking batch of the TorchScript path computes.

Triton ships with CUDA builds of torch on Linux; where it is missing (CPU wheels, macOS), ``AVAILABLE`` is
False and the GRU keeps its TorchScript path. ``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors,
which is how the test suite checks it on machines without a GPU.
"""

from __future__ import annotations

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

BLOCK_B = 16  # rows per program: tl.dot needs at least 16
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

    # No specialising on the sizes (Triton's default recompiles for 1 and multiples of 16): one compiled
    # kernel per model serves every chunk length and batch size.
    @triton.jit(do_not_specialize=["steps", "batch"])
    def _layer_kernel(
        gx_ptr,  # (T, B, 3H) input projection with every bias outside the reset gate folded in
        h0_ptr,  # (B, H)
        w_hh_ptr,  # (3H, H), gate order r, z, n
        b_hn_ptr,  # (H,) the torch variant's b_hn, inside the reset gate (unused by seed)
        lengths_ptr,  # (B,) int32 steps per row
        out_ptr,  # (T, B, H)
        h_n_ptr,  # (B, H)
        steps,
        batch,
        HIDDEN: tl.constexpr,
        HIDDEN_P2: tl.constexpr,  # HIDDEN rounded up to a power of two: padded lanes stay zero
        SEED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        cols = tl.arange(0, HIDDEN_P2)  # (HP,)
        row_ok = rows < batch
        col_ok = cols < HIDDEN
        tile_ok = row_ok[:, None] & col_ok[None, :]
        state = rows[:, None] * HIDDEN + cols[None, :]  # (BLOCK, HP) offsets into (B, H)

        # W^T blocks (H_in, H_out) for h @ W^T: element [k, j] is W[gate * H + j, k].
        k = tl.arange(0, HIDDEN_P2)
        w_ok = col_ok[None, :] & (k < HIDDEN)[:, None]
        w_t = cols[None, :] * HIDDEN + k[:, None]
        w_r = tl.load(w_hh_ptr + w_t, mask=w_ok, other=0.0)
        w_z = tl.load(w_hh_ptr + HIDDEN * HIDDEN + w_t, mask=w_ok, other=0.0)
        w_n = tl.load(w_hh_ptr + 2 * HIDDEN * HIDDEN + w_t, mask=w_ok, other=0.0)
        b_hn = tl.load(b_hn_ptr + cols, mask=col_ok, other=0.0)

        h = tl.load(h0_ptr + state, mask=tile_ok, other=0.0)
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
        gate = rows[:, None] * (3 * HIDDEN) + cols[None, :]  # (BLOCK, HP) offsets into one step of gx
        t = 0
        while t < steps:  # a while loop: Triton's interpreter cannot range() over a runtime scalar
            g = gx_ptr + t * batch * 3 * HIDDEN + gate
            x_r = tl.load(g, mask=tile_ok, other=0.0)
            x_z = tl.load(g + HIDDEN, mask=tile_ok, other=0.0)
            x_n = tl.load(g + 2 * HIDDEN, mask=tile_ok, other=0.0)
            r = _sigmoid(x_r + tl.dot(h, w_r, input_precision="ieee"))
            z = _sigmoid(x_z + tl.dot(h, w_z, input_precision="ieee"))
            if SEED:
                n = _tanh(x_n + tl.dot(r * h, w_n, input_precision="ieee"))
                h_new = h + z * (n - h)  # z ⊙ n + (1 − z) ⊙ h
            else:
                n = _tanh(x_n + r * (tl.dot(h, w_n, input_precision="ieee") + b_hn[None, :]))
                h_new = n + z * (h - n)  # (1 − z) ⊙ n + z ⊙ h
            h = tl.where((t < length)[:, None], h_new, h)  # an ended row keeps its state
            tl.store(out_ptr + t * batch * HIDDEN + state, h, mask=tile_ok)
            t += 1
        tl.store(h_n_ptr + state, h, mask=tile_ok)


def supports(x: Tensor) -> bool:
    """Whether the GRU should run this input here: Triton present, fp32, on CUDA."""
    return AVAILABLE and x.is_cuda and x.dtype == torch.float32


def run_layers(
    x: Tensor,
    h0: Tensor,
    weights: Weights,
    lengths: list[int],
    seed: bool,
) -> tuple[Tensor, Tensor]:
    """Every layer over every step: x (T, B, I), h0 (L, B, H), lengths (B,) -> (T, B, H), (L, B, H).

    The same contract as ``model.gru._run_layers``, lengths in any order; every parameter on x's device.
    """
    weights_ih, biases_ih, weights_hh, biases_hh = weights
    steps, batch, _ = x.shape
    hidden = h0.size(2)
    steps_per_row = torch.tensor(lengths, dtype=torch.int32).to(x.device, non_blocking=True)
    layer_input = x
    h_n = torch.empty_like(h0)
    grid = (triton.cdiv(batch, BLOCK_B),)
    padded = triton.next_power_of_2(max(hidden, 16))
    for layer, (w_ih, b_ih, w_hh, b_hh) in enumerate(zip(weights_ih, biases_ih, weights_hh, biases_hh, strict=True)):
        if seed:  # every b_h* is outside the reset gate
            folded, b_hn = b_ih + b_hh, b_hh[2 * hidden :]
        else:  # b_hr, b_hz fold; b_hn stays inside r ⊙ (W_hn h + b_hn)
            folded = b_ih + torch.cat([b_hh[: 2 * hidden], b_hh.new_zeros(hidden)])
            b_hn = b_hh[2 * hidden :]
        gx = F.linear(layer_input, w_ih, folded).contiguous()  # (T, B, 3H)
        out = x.new_empty(steps, batch, hidden)
        _layer_kernel[grid](
            gx, h0[layer].contiguous(), w_hh.contiguous(), b_hn.contiguous(), steps_per_row, out, h_n[layer],
            steps, batch,
            HIDDEN=hidden, HIDDEN_P2=padded, SEED=seed, BLOCK=BLOCK_B,
            num_warps=4 if padded <= 64 else 8,  # the three W^T blocks live in registers across the loop
        )
        layer_input = out
    return layer_input, h_n
