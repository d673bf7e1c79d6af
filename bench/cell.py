"""Our GRU against ``torch.nn.GRU`` at serving shapes, on CPU or a GPU; prints a table of median times.

    python -m bench.cell                 # CPU, the service's thread count (GRU_TORCH_THREADS, else cores - 1)
    python -m bench.cell --threads 1 --min-run-time 0.5
    python -m bench.cell --device cuda   # against cuDNN; TF32 off everywhere, so all sides compute in fp32
    python -m bench.cell --shapes 4,128,1 --batches 256 --steps 32 --rounds 5   # one row, read again

For each shape (I, H, L) × batch B × steps T, under ``torch.inference_mode``:

- ``nn.GRU``: ``torch.nn.GRU(I, H, L, batch_first=True)``, the reference (cuDNN on a GPU);
- ``ours torch``: ``model.gru.GRU.from_torch(reference)``, the "torch" variant with the same weights, whose
  outputs must match nn.GRU's within 1e-5;
- ``ours seed``: ``model.gru.GRU`` with the "seed" variant (what the service ships by default), checked
  against a step-by-step loop over its own cells;
- on a GPU, ``ours unfused``: the torch variant forced onto the TorchScript recurrence (``use_fused =
  False``), to show what the fused Triton kernel (``model/fused.py``) buys;
- ``naive loop``: that plain Python loop over ``GRUCell.forward`` (torch variant), per step and layer.

``--clock cpu`` times the calling thread's CPU time instead of the wall clock (with one torch thread): on a
machine busy with other work, the time this process waits for a core does not count.

Times are in µs: medians from ``torch.utils.benchmark.Timer.blocked_autorange`` (on a GPU its clock waits
for the GPU at each block's start and end, so a block's mean is the time per call queued back to back)
after a warm-up, the functions interleaved over ``--rounds`` rounds and the lowest round's median kept
(other work on a shared machine only ever adds time). Ratios are ours / nn.GRU: below 1.0 is faster.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.benchmark import Timer

from bench.common import machine, service_threads
from model.gru import GRU

SHAPES = ((1, 64, 2), (4, 128, 1))  # (input_size, hidden_size, num_layers)
BATCHES = (1, 64, 256)
STEPS = (1, 8, 32)
TOLERANCE = 1e-5


def naive_loop(gru: GRU, x: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """What one writes first: every step through every layer's ``GRUCell.forward``."""
    hs = list(h0.unbind(0))
    outs = []
    for t in range(x.size(1)):
        layer_input = x[:, t]
        for layer, cell in enumerate(gru.cells):
            hs[layer] = cell(layer_input, hs[layer])
            layer_input = hs[layer]
        outs.append(layer_input)
    return torch.stack(outs, 1), torch.stack(hs)


@dataclass
class Row:
    shape: tuple[int, int, int]
    batch: int
    steps: int
    times_us: dict[str, float]  # per contender, "nn.GRU" first
    max_diff: float  # max |ours torch − nn.GRU| and |ours seed − naive seed loop| over out and h_n

    @property
    def reference_us(self) -> float:
        return self.times_us["nn.GRU"]


def best_median_us(fns: list[Callable[[], object]], min_run_time: float, threads: int,
                    rounds: int, clock: Callable[[], float]) -> list[float]:
    """Per function, the lowest of ``rounds`` medians, the functions interleaved round by round."""
    timers = []
    for fn in fns:
        for _ in range(3):  # warm-up: TorchScript profiles and optimises on its first calls
            fn()
        timers.append(Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, timer=clock))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer.blocked_autorange(min_run_time=min_run_time).median * 1e6)
    return best


def _cuda_wall_clock() -> float:
    """Wall time once the GPU has finished what was queued. Timing a block of asynchronous calls by the
    plain wall clock measures how fast the host queues them, and hands the backlog to the next function."""
    torch.cuda.synchronize()
    return time.perf_counter()


def clock_for(clock: str, device: str) -> Callable[[], float]:
    """The timer ``Timer`` is given: it replaces Timer's own, so on a GPU it must wait for the GPU itself."""
    if clock == "cpu":
        return time.thread_time
    return time.perf_counter if device == "cpu" else _cuda_wall_clock


def _max_diff(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> float:
    return max(float((a[0] - b[0]).abs().max()), float((a[1] - b[1]).abs().max()))


def measure(shape: tuple[int, int, int], batch: int, steps: int, min_run_time: float, threads: int,
            rounds: int, clock: Callable[[], float] = time.perf_counter, device: str = "cpu") -> Row:
    inputs, hidden, layers = shape
    torch.manual_seed(0)
    reference = nn.GRU(inputs, hidden, layers, batch_first=True).to(device).eval()
    ours_torch = GRU.from_torch(reference).eval()
    ours_seed = GRU(inputs, hidden, layers, variant="seed").to(device).eval()
    x = torch.randn(batch, steps, inputs, device=device)  # (B, T, I)
    h0 = torch.randn(layers, batch, hidden, device=device) * 0.5  # (L, B, H)
    contenders: dict[str, Callable[[], object]] = {
        "nn.GRU": lambda: reference(x, h0), "ours torch": lambda: ours_torch(x, h0),
        "ours seed": lambda: ours_seed(x, h0),
    }
    if device != "cpu":
        ours_unfused = GRU.from_torch(reference).eval()
        ours_unfused.use_fused = False
        contenders["ours unfused"] = lambda: ours_unfused(x, h0)
    contenders["naive loop"] = lambda: naive_loop(ours_torch, x, h0)
    with torch.inference_mode():
        max_diff = max(_max_diff(ours_torch(x, h0), reference(x, h0)),
                       _max_diff(ours_seed(x, h0), naive_loop(ours_seed, x, h0)))
        times = best_median_us(list(contenders.values()), min_run_time, threads, rounds, clock)
    return Row(shape, batch, steps, dict(zip(contenders, times, strict=True)), max_diff)


def _ratio(value: float, reference: float) -> str:
    ratio = value / reference
    text = f"{ratio:.2f}x"
    return f"[red]{text}[/red]" if ratio > 1.0 else f"[green]{text}[/green]"


def table(rows: list[Row], threads: int, clock: str, device: str) -> Table:
    what = "thread CPU time" if clock == "cpu" else "wall time"
    plural = "s" if threads != 1 else ""
    where = f"on CPU ({threads} torch thread{plural}" if device == "cpu" else f"on {device} (TF32 off"
    out = Table(title=f"GRU forward {where}, inference_mode), median µs of {what}")
    names = list(rows[0].times_us)
    for name in ("I H L", "B", "T", names[0]):
        out.add_column(name, justify="right")
    for name in names[1:]:
        out.add_column(name, justify="right")
        out.add_column("ratio", justify="right")
    out.add_column("max abs diff", justify="right")
    for row in rows:
        cells = [f"{row.reference_us:,.1f}"]
        for name in names[1:]:
            cells += [f"{row.times_us[name]:,.1f}", _ratio(row.times_us[name], row.reference_us)]
        out.add_row(" ".join(map(str, row.shape)), str(row.batch), str(row.steps), *cells, f"{row.max_diff:.1e}")
    return out


def summary(rows: list[Row]) -> list[str]:
    lines = []
    for name in list(rows[0].times_us)[1:]:
        ratios = [r.times_us[name] / r.reference_us for r in rows]
        slower = [r for r in rows if r.times_us[name] > r.reference_us]
        lines.append(f"{name}: {min(ratios):.2f}x to {max(ratios):.2f}x of nn.GRU; slower than nn.GRU at "
                     f"{len(slower)}/{len(rows)} shapes")
    bad = [r for r in rows if r.max_diff >= TOLERANCE]
    lines.append(f"outputs: {'all within' if not bad else f'{len(bad)} shapes NOT within'} {TOLERANCE:g}"
                 f" (largest {max(r.max_diff for r in rows):.1e})")
    return lines


def _shape(text: str) -> tuple[int, int, int]:
    inputs, hidden, layers = (int(part) for part in text.split(","))
    return inputs, hidden, layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cell", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="default: the service's")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per median")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the lowest median counts")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this thread's CPU time, blind to other work on the machine (one thread only)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to race cuDNN")
    parser.add_argument("--shapes", nargs="+", type=_shape, default=SHAPES, metavar="I,H,L",
                        help="input size, hidden size, layers; default: the serving shapes")
    parser.add_argument("--batches", nargs="+", type=int, default=BATCHES, metavar="B")
    parser.add_argument("--steps", nargs="+", type=int, default=STEPS, metavar="T")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        if args.clock == "cpu":
            parser.error("--clock cpu cannot see GPU time")
        # cuDNN and cuBLAS may use TF32 by default, 1e-3 off fp32: compare like with like
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    threads = args.threads or service_threads()
    if args.clock == "cpu":
        if args.threads not in (0, 1):
            parser.error("--clock cpu counts the calling thread only: it needs --threads 1")
        threads = 1
    clock = clock_for(args.clock, args.device)
    torch.set_num_threads(threads)
    console = Console(width=max(Console().width, 160))
    console.print(f"machine: {machine()}; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    console.print(f"torch threads: {torch.get_num_threads()} (the service's: GRU_TORCH_THREADS or cores - 1)")
    rows = []
    with console.status("timing") as status:
        for shape in args.shapes:
            for batch in args.batches:
                for steps in args.steps:
                    status.update(f"timing I H L = {shape}, B={batch}, T={steps}")
                    rows.append(measure(shape, batch, steps, args.min_run_time, threads, args.rounds, clock,
                                         args.device))
    console.print(table(rows, threads, args.clock, args.device))
    for line in summary(rows):
        console.print(line)
    return 0 if all(r.max_diff < TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
