"""The Dockerfile read as instructions, for the tests that check it and the ones that run what it runs."""

from __future__ import annotations

from pathlib import Path

Instruction = tuple[int, str, str]  # (stage index, INSTRUCTION, arguments)


def read_instructions(dockerfile: Path) -> list[Instruction]:
    """The Dockerfile's instructions with continuation lines joined, numbered by build stage."""
    logical: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stage = -1
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append((stage, keyword, args.strip()))
    return out


def final(instructions: list[Instruction], keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction of the last (runtime) stage."""
    last = max(stage for stage, _, _ in instructions)
    return [args for stage, kw, args in instructions if stage == last and kw == keyword]
