"""What the command line's reading of a CSV costs: peak memory and time for a long series.

    python -m bench.cli_csv
    python -m bench.cli_csv --rows 200000

A CSV of ``--rows`` rows (a timestamp and two numeric columns) is written to a temporary directory, then a
fresh Python process reads it as ``python -m service.client stream`` does (``read_csv``) and cuts it into
the chunks of 32 steps the client sends (``_chunks``). Its peak resident memory is reported beside what the
same process holds after its imports alone, so the difference is what the series costs.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import machine
from harness.processes import ROOT

# The peak is VmHWM, this program's own: ru_maxrss keeps the forked parent's pages from before the exec.
_MEASURE = """
import json, re, sys, time
from pathlib import Path
from service.client import _chunks
from service.client.cli import read_csv
def peak_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])
imported = peak_kib()
began = time.perf_counter()
names, rows = read_csv(Path(sys.argv[1]), ["a", "b"], None)
read = time.perf_counter() - began
chunks = sum(1 for _ in _chunks(rows, 32))
print(json.dumps({"rows": len(rows), "chunks": chunks, "read_s": read, "imported_kib": imported,
                  "peak_kib": peak_kib()}))
"""


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    draw = random.Random(seed)
    with path.open("w") as file:
        file.write("time,a,b\n")
        for i in range(rows):
            file.write(f"2026-01-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d},"
                       f"{draw.random() * 100:.4f},{draw.random():.6f}\n")


def measure(rows: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "series.csv"
        write_csv(path, rows)
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
        result["file_mib"] = path.stat().st_size / 2**20
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cli_csv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the CSV (default 1,000,000)")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    result = measure(args.rows)
    table = Table(title=f"CLI CSV reading: python -m bench.cli_csv --rows {args.rows}, {machine()}")
    for column in ("rows", "CSV MiB", "read s", "peak RSS MiB", "after imports MiB", "series MiB", "chunks"):
        table.add_column(column, justify="right")
    peak, imported = result["peak_kib"] / 1024, result["imported_kib"] / 1024
    table.add_row(f"{result['rows']:,.0f}", f"{result['file_mib']:.1f}", f"{result['read_s']:.2f}", f"{peak:.0f}",
                  f"{imported:.0f}", f"{peak - imported:.0f}", f"{result['chunks']:,.0f}")
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
