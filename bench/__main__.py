"""Every benchmark, one after the other:  python -m bench  (what ``make bench`` runs).

1. ``bench.cell``: our GRU against torch.nn.GRU at serving shapes;
2. ``bench.load``: the service against a naive FastAPI + nn.GRU server, one load generator for both;
3. ``bench.memory``: resident bytes per live session in the memory store.

Each part also runs alone (``python -m bench.cell``, ``python -m bench.load --duration 10``,
``python -m bench.memory``); arguments after ``--load`` go to the load part, e.g.
``python -m bench --load --duration 5 --chunks 8``.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.rule import Rule

from bench import cell, load, memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", nargs=argparse.REMAINDER, default=[], metavar="ARG",
                        help="everything after it goes to the load part (python -m bench.load --help)")
    load_args: list[str] = parser.parse_args(argv).load
    console = Console()
    status = 0
    for title, part, part_args in (
        ("1. our GRU against torch.nn.GRU", cell.main, []),
        ("2. the service against a naive server, under load", load.main, load_args),
        ("3. memory per session", memory.main, []),
    ):
        console.print(Rule(title))
        status = part(part_args) or status
    return status


if __name__ == "__main__":
    raise SystemExit(main())
