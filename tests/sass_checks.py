"""Checks on a kernel's SASS (what `cuobjdump -sass` prints) that the compile tests share.

``descriptor_reads_before_writes`` guards against a ptxas 12.8 miscompile that the lookahead
schedule of the Gluon 8-bit kernel hit on the H200 (compute-sanitizer: an out-of-bounds shared
read by a wgmma): ptxas advanced a wgmma's shared-memory descriptor from one k-step to the next by
adding to a uniform register that, on one of the paths into that code, nothing had written.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
UNIFORM_REGISTERS = 64
BRANCHES = ("BRA", "EXIT", "RET", "JMP")  # direct transfers; unpredicated, they do not fall through
INDIRECT_BRANCHES = ("BRX", "JMX")


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(resource usage, disassembly) of a cubin, from the cuobjdump Triton ships."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        usage, sass = (
            subprocess.run(
                [str(cuobjdump), flag, str(path)], capture_output=True, text=True, check=True
            ).stdout
            for flag in ("-res-usage", "-sass")
        )
        return usage, sass


def _parse(text: str) -> tuple[bool, str, list[str]]:
    """(predicated, opcode, operands) of one instruction's text."""
    predicated = text.startswith("@")
    body = re.sub(r"^@!?U?P\w+\s+", "", text)
    opcode, _, operands = body.partition(" ")
    return predicated, opcode, [o.strip() for o in operands.split(",")] if operands else []


def _branch_target(opcode: str, operands: list[str]) -> int | None:
    if opcode.split(".")[0] != "BRA" or not operands:
        return None
    match = re.search(r"0x([0-9a-f]+)", operands[-1])
    return int(match.group(1), 16) if match else None


def _after(text: str, defined: frozenset[int]) -> frozenset[int]:
    """The uniform registers holding defined values after one instruction.

    An instruction whose first operand is a bare ``URn`` writes it (and ``URn+1`` for a ``.64``
    operation); the result is defined when every uniform register it reads is, and not
    otherwise: a value computed from an unwritten register is no better than it. A predicated
    write may not happen, so it can only take definedness away.
    """
    predicated, opcode, operands = _parse(text)
    first = re.fullmatch(r"UR(\d+)", operands[0]) if operands else None
    if first is None:
        return defined
    wide = ".64" in opcode
    register = int(first.group(1))
    written = {register, register + 1} if wide else {register}
    sources = set()
    for operand in operands[1:]:
        for match in re.finditer(r"\bUR(\d+)", operand):
            source = int(match.group(1))
            sources |= {source, source + 1} if wide else {source}
    if sources <= defined and not predicated:
        return defined | written
    return defined - written if not sources <= defined else defined


def _descriptor_registers(text: str) -> set[int]:
    """The uniform registers a wgmma (``IGMMA``/``QGMMA``/``HGMMA``...) reads its shared-memory
    descriptors from: ``gdesc[URx]`` names A's (``URx``, ``URx+1``) and B's (``URx+2``,
    ``URx+3``); with A in registers only B's."""
    _, opcode, operands = _parse(text)
    if not re.match(r"[A-Z]GMMA\b", opcode):
        return set()
    for position, operand in enumerate(operands):
        match = re.fullmatch(r"gdesc\[UR(\d+)\]", operand)
        if match:
            base = int(match.group(1))
            a_in_registers = position >= 2 and operands[1].startswith("R")
            return {base + 2, base + 3} if a_in_registers else set(range(base, base + 4))
    return set()


def descriptor_reads_before_writes(sass: str) -> list[tuple[int, str]]:
    """(address, register) of every wgmma descriptor read from a uniform register that on some
    path from the kernel's entry holds no defined value (never written, or computed from one
    that was not).

    A forward "definitely defined" dataflow over the basic blocks of the disassembly. The
    indirect branch of a warp-specialized kernel (its partitions' jump table) is taken to reach
    every block no forward branch or fall-through reaches.
    """
    instructions = [(int(a, 16), text.strip()) for a, text in INSTRUCTION.findall(sass)]
    index = {address: i for i, (address, _) in enumerate(instructions)}
    leaders = {0}
    for i, (_, text) in enumerate(instructions):
        _, opcode, operands = _parse(text)
        if opcode.split(".")[0] in BRANCHES + INDIRECT_BRANCHES:
            leaders.add(i + 1)
            target = _branch_target(opcode, operands)
            if target in index:
                leaders.add(index[target])
    starts = sorted(s for s in leaders if s < len(instructions))
    blocks = list(zip(starts, [*starts[1:], len(instructions)], strict=True))
    block_at = {start: n for n, (start, _) in enumerate(blocks)}

    successors: list[list[int]] = [[] for _ in blocks]
    indirect = []
    for n, (_, end) in enumerate(blocks):
        predicated, opcode, operands = _parse(instructions[end - 1][1])
        kind = opcode.split(".")[0]
        target = _branch_target(opcode, operands)
        if target in index:
            successors[n].append(block_at[index[target]])
        if kind in INDIRECT_BRANCHES:
            indirect.append(n)
        elif (predicated or kind not in BRANCHES) and end < len(instructions):
            successors[n].append(block_at[end])
    # Only a forward edge counts as reaching a block: a partition's first block can also be the
    # target of its own retry loop's backward branch.
    reached = {s for n, targets in enumerate(successors) for s in targets if s > n}
    for n in indirect:
        successors[n] += [m for m in range(1, len(blocks)) if m not in reached and m != n]
    predecessors: list[list[int]] = [[] for _ in blocks]
    for n, targets in enumerate(successors):
        for target in targets:
            predecessors[target].append(n)

    everything = frozenset(range(UNIFORM_REGISTERS))

    def entering(n: int, out: list[frozenset[int]]) -> frozenset[int]:
        if n == 0:
            return frozenset()
        return frozenset.intersection(*(out[p] for p in predecessors[n]))

    out = [frozenset() if n == 0 else everything for n in range(len(blocks))]
    changed = True
    while changed:
        changed = False
        for n, (start, end) in enumerate(blocks):
            if n and not predecessors[n]:
                continue  # unreachable
            defined = entering(n, out)
            for i in range(start, end):
                defined = _after(instructions[i][1], defined)
            if defined != out[n]:
                out[n], changed = defined, True

    found = []
    for n, (start, end) in enumerate(blocks):
        if n and not predecessors[n]:
            continue
        defined = entering(n, out)
        for i in range(start, end):
            address, text = instructions[i]
            found += [(address, f"UR{r}") for r in sorted(_descriptor_registers(text) - defined)]
            defined = _after(text, defined)
    return found
