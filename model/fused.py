"""The whole GRU forward as one Triton kernel launch: the GPU path of ``model.gru.GRU`` at inference.

The TorchScript recurrence launches six small kernels per step and layer, and at serving sizes each costs
more in launch latency than in arithmetic; here one launch runs every layer over the whole chunk, one or two
batch rows per program, in fp32 FMA so results match the TorchScript path to 1e-5. Rows of unequal length
keep their state past their end (``tl.where`` on ``t < length``). Design: docs/model.md, "The fused GPU
kernel"; measurements and history: docs/bench.md part 4.

Triton ships with CUDA builds of torch on Linux; where it is missing (CPU wheels, macOS), ``AVAILABLE`` is
False and the GRU keeps its TorchScript path. ``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors,
which is how the test suite checks it on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
from torch import Tensor

from model.derived import Weights

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the TorchScript path serves
    AVAILABLE = False
else:
    AVAILABLE = True


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

    @triton.jit
    def _gate_blocks(w_ptr, HIDDEN: tl.constexpr, HIDDEN_P2: tl.constexpr, WIDTH: tl.constexpr,
                     WIDTH_P2: tl.constexpr):
        """A (3H, WIDTH) weight's gate blocks r, z, n, each (1, HP, WP) = W[gate * H + j, k], zero when padded."""
        j = tl.arange(0, HIDDEN_P2)[None, :, None]  # output unit
        k = tl.arange(0, WIDTH_P2)[None, None, :]  # input unit
        mask = (j < HIDDEN) & (k < WIDTH)
        w = w_ptr + j * WIDTH + k
        w_r = tl.load(w, mask=mask, other=0.0)
        w_z = tl.load(w + HIDDEN * WIDTH, mask=mask, other=0.0)
        w_n = tl.load(w + 2 * HIDDEN * WIDTH, mask=mask, other=0.0)
        return w_r, w_z, w_n

    @triton.jit
    def _layer(
        src_ptr,  # (B, T, WIDTH) this layer's input: x, or the layer below's output
        dst_ptr,  # (B, T, H)
        h0_ptr,  # (B, H)
        h_n_ptr,  # (B, H)
        w_ih_ptr,  # (3H, WIDTH), gate order r, z, n
        b_ih_ptr,  # (3H,)
        w_hh_ptr,  # (3H, H)
        b_hh_ptr,  # (3H,)
        rows,  # (R, 1) this program's batch rows
        length,  # (R, 1) steps per row, or the scalar chunk length when every row runs all of them
        steps,
        batch,
        WIDTH: tl.constexpr,
        WIDTH_P2: tl.constexpr,
        HIDDEN: tl.constexpr,
        HIDDEN_P2: tl.constexpr,
        STREAM: tl.constexpr,
        SEED: tl.constexpr,
    ):
        """One layer over every step for this program's rows."""
        j = tl.arange(0, HIDDEN_P2)[None, :]  # (1, HP) output unit
        i = tl.arange(0, WIDTH_P2)[None, :]  # (1, WP) input unit
        ok = (rows < batch) & (j < HIDDEN)
        in_ok = (rows < batch) & (i < WIDTH)
        if not STREAM:
            wi_r, wi_z, wi_n = _gate_blocks(w_ih_ptr, HIDDEN, HIDDEN_P2, WIDTH, WIDTH_P2)
            w_r, w_z, w_n = _gate_blocks(w_hh_ptr, HIDDEN, HIDDEN_P2, HIDDEN, HIDDEN_P2)
        b_r = tl.load(b_ih_ptr + j, mask=j < HIDDEN, other=0.0) + tl.load(b_hh_ptr + j, mask=j < HIDDEN, other=0.0)
        b_z = tl.load(b_ih_ptr + HIDDEN + j, mask=j < HIDDEN, other=0.0)
        b_z += tl.load(b_hh_ptr + HIDDEN + j, mask=j < HIDDEN, other=0.0)
        b_in = tl.load(b_ih_ptr + 2 * HIDDEN + j, mask=j < HIDDEN, other=0.0)
        b_hn = tl.load(b_hh_ptr + 2 * HIDDEN + j, mask=j < HIDDEN, other=0.0)

        h = tl.load(h0_ptr + rows * HIDDEN + j, mask=ok, other=0.0)  # (R, HP)
        t = 0
        while t < steps:  # a while loop: Triton's interpreter cannot range() over a runtime scalar
            if STREAM:
                wi_r, wi_z, wi_n = _gate_blocks(w_ih_ptr, HIDDEN, HIDDEN_P2, WIDTH, WIDTH_P2)
                w_r, w_z, w_n = _gate_blocks(w_hh_ptr, HIDDEN, HIDDEN_P2, HIDDEN, HIDDEN_P2)
            # The input projection: independent of h, so it overlaps the hidden one rather than waiting on it
            v = tl.load(src_ptr + (rows * steps + t) * WIDTH + i, mask=in_ok, other=0.0)[:, None, :]
            x_r = tl.sum(wi_r * v, axis=2) + b_r
            x_z = tl.sum(wi_z * v, axis=2) + b_z
            x_n = tl.sum(wi_n * v, axis=2) + b_in
            r = _sigmoid(x_r + tl.sum(w_r * h[:, None, :], axis=2))
            z = _sigmoid(x_z + tl.sum(w_z * h[:, None, :], axis=2))
            if SEED:
                n = _tanh(x_n + b_hn + tl.sum(w_n * (r * h)[:, None, :], axis=2))
                h_new = h + z * (n - h)  # z ⊙ n + (1 − z) ⊙ h
            else:
                n = _tanh(x_n + r * (tl.sum(w_n * h[:, None, :], axis=2) + b_hn))
                h_new = n + z * (h - n)  # (1 − z) ⊙ n + z ⊙ h
            h = tl.where(t < length, h_new, h)  # an ended row keeps its state
            tl.store(dst_ptr + (rows * steps + t) * HIDDEN + j, h, mask=ok)
            t += 1
        tl.store(h_n_ptr + rows * HIDDEN + j, h, mask=ok)

    # No specialising on the chunk length (Triton's default recompiles for 1 and multiples of 16) or the
    # batch size: one compiled kernel per model serves every batch.
    @triton.jit(do_not_specialize=["steps", "batch"])
    def _gru_kernel(
        x_ptr,  # (B, T, I)
        h0_ptr,  # (L, B, H)
        w_ih0_ptr,  # (3H, I) the first layer's
        w_ih_ptr,  # (L - 1, 3H, H) the others'
        b_ih_ptr,  # (L, 3H)
        w_hh_ptr,  # (L, 3H, H)
        b_hh_ptr,  # (L, 3H)
        lengths_ptr,  # (B,) int32 steps per row, read only when RAGGED
        out_ptr,  # (B, T, H) the last layer's output
        scratch_ptr,  # (B, T, H) the output of every other layer below the last, when L > 1
        h_n_ptr,  # (L, B, H)
        steps,
        batch,
        INPUT: tl.constexpr,
        INPUT_P2: tl.constexpr,
        HIDDEN: tl.constexpr,
        HIDDEN_P2: tl.constexpr,  # HIDDEN rounded up to a power of two: padded lanes stay zero
        LAYERS: tl.constexpr,
        ROWS: tl.constexpr,  # batch rows per program, sharing each read of the weights
        STREAM: tl.constexpr,  # read the weights every step (from cache) rather than hold them in registers
        SEED: tl.constexpr,
        RAGGED: tl.constexpr,  # rows of unequal length (else every row runs all steps)
    ):
        # offsets reach B · T · H, past int32 for long chunks
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]  # (R, 1)
        length = tl.load(lengths_ptr + rows, mask=rows < batch, other=0) if RAGGED else steps
        for layer in tl.static_range(LAYERS):
            # The last layer writes out; those below it alternate with scratch, so none reads what it writes.
            dst = out_ptr if (LAYERS - 1 - layer) % 2 == 0 else scratch_ptr
            state = layer * batch * HIDDEN
            gates = layer * 3 * HIDDEN
            if layer == 0:
                _layer(x_ptr, dst, h0_ptr, h_n_ptr, w_ih0_ptr, b_ih_ptr, w_hh_ptr, b_hh_ptr, rows, length, steps,
                       batch, INPUT, INPUT_P2, HIDDEN, HIDDEN_P2, STREAM, SEED)
            else:
                src = scratch_ptr if (LAYERS - 1 - layer) % 2 == 0 else out_ptr
                _layer(src, dst, h0_ptr + state, h_n_ptr + state, w_ih_ptr + (layer - 1) * 3 * HIDDEN * HIDDEN,
                       b_ih_ptr + gates, w_hh_ptr + gates * HIDDEN, b_hh_ptr + gates, rows, length, steps, batch,
                       HIDDEN, HIDDEN_P2, HIDDEN, HIDDEN_P2, STREAM, SEED)
            tl.debug_barrier()  # every thread's stores of this layer's output, before the next layer reads it


class LaunchConfig(NamedTuple):
    rows: int  # batch rows per program
    warps: int  # warps per program
    stream: bool  # the weights read every step rather than held in registers


def launch_config(hidden_p2: int, batch: int, multiprocessors: int) -> LaunchConfig:
    """How to launch for a hidden size and batch: one row per program at 4 warps with the weights in
    registers while they fit (H <= 64) or while every row has a multiprocessor to itself (H <= 128);
    otherwise two rows per program sharing each read of the weights, read every step, at 8 warps (16 above
    H = 128). Why, from sweeps on one H200: docs/model.md, "The launch rule", and docs/bench.md part 4."""
    if hidden_p2 <= 64 or (hidden_p2 <= 128 and batch <= multiprocessors):
        return LaunchConfig(rows=1, warps=4, stream=False)
    return LaunchConfig(rows=2, warps=8 if hidden_p2 <= 128 else 16, stream=True)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    """Fixed per device: looked up once, not on every forward."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


Stacked = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def stack(weights: Weights) -> Stacked:
    """The layers' weights as the kernel reads them: W_ih of the first layer, W_ih of the others, b_ih,
    W_hh, b_hh, each contiguous and stacked per kind (kept by ``model.derived.Derived``: stacking on
    every call would cost four more launches)."""
    weights_ih, biases_ih, weights_hh, biases_hh = weights
    return (
        weights_ih[0].contiguous(),
        torch.stack(weights_ih[1:]) if len(weights_ih) > 1 else weights_hh[0],  # a placeholder for L = 1
        torch.stack(biases_ih), torch.stack(weights_hh), torch.stack(biases_hh),
    )


def supports(x: Tensor) -> bool:
    """Whether the GRU should run this input here: Triton present, fp32, on CUDA."""
    return AVAILABLE and x.is_cuda and x.dtype == torch.float32


def run_layers(
    x: Tensor,
    h0: Tensor,
    stacked: Stacked,
    lengths: list[int] | None,
    seed: bool,
) -> tuple[Tensor, Tensor]:
    """Every layer over every step: x (B, T, I), h0 (L, B, H) -> (B, T, H), (L, B, H).

    ``model.gru._run_layers``'s contract; ``lengths`` in any order, or None when every row runs all T steps.
    One launch for the whole forward, input projections included.
    """
    batch, steps, inputs = x.shape
    layers, _, hidden = h0.shape
    if batch == 0:
        return x.new_empty(0, steps, hidden), h0.new_empty(h0.shape)
    padded = triton.next_power_of_2(hidden)
    config = launch_config(padded, batch, _multiprocessors(x.device.index) if x.is_cuda else 1)
    ragged = lengths is not None and min(lengths) < steps
    # Only ragged batches pay for the copy to the device; others pass a placeholder the kernel never reads.
    steps_per_row = torch.tensor(lengths, dtype=torch.int32).to(x.device) if ragged else h0
    x, h0 = x.contiguous(), h0.contiguous()
    out = x.new_empty(batch, steps, hidden)
    scratch = x.new_empty(batch, steps, hidden) if layers > 1 else out
    h_n = torch.empty_like(h0)  # contiguous, as h0 now is: the kernel indexes both as (L, B, H)
    # Triton launches on the current CUDA device: make it x's (a no-op for the service, which uses one).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _gru_kernel[(triton.cdiv(batch, config.rows),)](
            x, h0, *stacked, steps_per_row, out, scratch, h_n, steps, batch,
            INPUT=inputs, INPUT_P2=triton.next_power_of_2(max(inputs, 2)), HIDDEN=hidden, HIDDEN_P2=padded,
            LAYERS=layers, ROWS=config.rows, STREAM=config.stream, SEED=seed, RAGGED=ragged,
            num_warps=config.warps,
        )
    return out, h_n
