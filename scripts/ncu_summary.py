"""Summary of an ncu source-page export (`ncu --import R.ncu-rep --page source --csv --print-source sass`): for each
profiled kernel, its warp-stall samples split into the regions between clock reads (a microbenchmark's timed
phases: `CS2R ... SR_CLOCKLO`), each with its top stall reasons, then the instructions with the most samples.

    python3 scripts/ncu_summary.py sass.csv[.gz] [--top 20]

`gpu_session.sh micro` runs it when MICRO_NCU is set (benchmarks/micro/product_body.cu's phases, session 18).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import pathlib
from dataclasses import dataclass

CLOCK_READ = "SR_CLOCKLO"  # clock64() in SASS: where a microbenchmark's timed regions begin and end


@dataclass
class Instruction:
    offset: int  # bytes from the kernel's first instruction
    text: str
    samples: int
    executed: int
    stalls: dict[str, int]  # reason -> samples

    def top_stalls(self, count: int = 2) -> str:
        return " ".join(f"{r}:{n}" for r, n in sorted(self.stalls.items(), key=lambda x: -x[1])[:count] if n)


def read_kernels(text: str) -> dict[str, list[Instruction]]:
    """Kernel name -> its instructions, in address order."""
    kernels: dict[str, list[Instruction]] = {}
    for block in text.split('"Kernel Name"')[1:]:
        name_line, _, table = block.partition("\n")
        name = next(csv.reader(io.StringIO(name_line.lstrip(","))))[0]
        rows = [r for r in csv.reader(io.StringIO(table)) if r]
        header, body = rows[0], rows[1:]
        column = {h: i for i, h in enumerate(header)}
        reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
        base = int(body[0][column["Address"]], 16)
        kernels[name] = [
            Instruction(int(r[column["Address"]], 16) - base, r[column["Source"]].strip(), int(r[column["# Samples"]]),
                        int(r[column["Instructions Executed"]]),
                        {h[len("stall_"):]: int(r[column[h]]) for h in reasons})
            for r in body
        ]  # fmt: skip
    return kernels


def regions(instructions: list[Instruction]) -> list[tuple[int, int, list[Instruction]]]:
    """The instructions between consecutive clock reads: (start offset, end offset, instructions)."""
    cuts = [i for i, ins in enumerate(instructions) if CLOCK_READ in ins.text]
    return [(instructions[a].offset, instructions[b].offset, instructions[a:b]) for a, b in zip(cuts, cuts[1:])]


def summarize(kernels: dict[str, list[Instruction]], top: int) -> str:
    lines = []
    for name, instructions in kernels.items():
        total = sum(ins.samples for ins in instructions) or 1
        lines.append(f"{name}: {len(instructions)} instructions, {total} samples")
        for start, end, part in regions(instructions):
            samples = sum(ins.samples for ins in part)
            stalls: dict[str, int] = {}
            for ins in part:
                for reason, n in ins.stalls.items():
                    stalls[reason] = stalls.get(reason, 0) + n
            summary = Instruction(start, "", samples, 0, stalls).top_stalls(3)
            lines.append(f"  region {start:6x}-{end:6x}: {samples:6d} samples ({100 * samples / total:4.1f}%) {summary}")
        lines.append(f"  top {top} instructions (offset, samples, executed, text, stalls):")
        for ins in sorted(instructions, key=lambda x: -x.samples)[:top]:
            lines.append(f"    {ins.offset:6x} {ins.samples:6d} {ins.executed:9d}  {ins.text[:56]:56s} {ins.top_stalls()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=pathlib.Path)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    raw = args.csv.read_bytes()
    text = (gzip.decompress(raw) if args.csv.suffix == ".gz" else raw).decode()
    print(summarize(read_kernels(text), args.top))


if __name__ == "__main__":
    main()
