"""Registers and spills of the megakernel of each example model's decode step, as ptxas reports them.

One kernel carries every task body, so the heaviest body sets every body's register budget (512 threads: at
most 128 each), and a spill on a streaming path costs local-memory round trips. This plans the decode step for
a GPU target without a GPU (benchmarks/planning.py's tracing and planning), compiles the generated source with the toolchain's
own flags plus ``-Xptxas -v`` and reports, per configuration, the kernel's registers, stack frame and spill
bytes, and every task-body variant (a noinline function) that spills, with its kernels. A compile-time fact:
comparing branches needs no GPU. Needs nvcc.

    python benchmarks/registers.py                                  # Llama-1B, Qwen3-0.6B, Qwen3-8B x batch 1, 8
    python benchmarks/registers.py --models llama-3.2-1b --batch 8
    python benchmarks/registers.py --layers 0                       # whole models (same variants, slower)

Writes registers_sm<arch>.{json,md} under --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from planning import models, plan_for_gpu, trace_decode_step  # noqa: E402

from jax_mpk.toolchain import NVCC_FLAGS, arch_flags, include_dir, nvcc, nvcc_version  # noqa: E402

KERNEL = "jax_mpk_megakernel"
_PROPERTIES = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads")  # fmt: skip
_USED = re.compile(r"Compiling entry function '" + KERNEL + r"'.*?Used (\d+) registers", re.S)
_VARIANT = re.compile(r"variant_(\d+)")
_DISPATCH = re.compile(r"case (\d+): \{?\s*variant_(\d+)\(")


def plan_source(model: str, batch: int, ctx: int, layers: int, arch: str, sms: int):
    """(generated source, kernel names by index) of ``model``'s decode step."""
    cfg = models.PRESETS[model]
    if layers:
        cfg = dataclasses.replace(cfg, layers=layers)
    stages = plan_for_gpu(trace_decode_step(cfg, batch, ctx), sms, arch)
    return stages.plan.source.text, [k.name for k in stages.graph.kernels]


def ptxas_report(source: str, arch: str) -> str:
    """ptxas's -v output for ``source`` compiled as the runtime compiles it."""
    with tempfile.TemporaryDirectory(prefix="jax_mpk_registers_") as work:
        src = pathlib.Path(work) / "megakernel.cu"
        src.write_text(source)
        command = [nvcc(), *NVCC_FLAGS, *arch_flags(arch), f"-I{include_dir()}", "-Xptxas", "-v", "-o",
                   str(pathlib.Path(work) / "megakernel.cubin"), str(src)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"nvcc failed:\n{done.stderr[-4000:]}")
    return done.stderr + done.stdout


def summarize(report: str, source: str, kernel_names: list[str]) -> dict:
    """The kernel's registers, stack and spills, and the variants that spill (with the kernels they run)."""
    used = _USED.search(report)
    if used is None:
        raise SystemExit(f"no register count for {KERNEL} in ptxas's report:\n{report[-2000:]}")
    kernels_of: dict[int, list[str]] = {}
    for kernel, variant in _DISPATCH.findall(source):
        kernels_of.setdefault(int(variant), []).append(kernel_names[int(kernel)])
    entry, spilling = None, []
    for name, stack, stores, loads in _PROPERTIES.findall(report):
        numbers = {"stack_bytes": int(stack), "spill_store_bytes": int(stores), "spill_load_bytes": int(loads)}
        if name == KERNEL:
            entry = numbers
        elif (variant := _VARIANT.search(name)) and (int(stores) or int(loads)):
            index = int(variant.group(1))
            spilling.append({"variant": index, "kernels": sorted(set(kernels_of.get(index, []))), **numbers})
    if entry is None:
        raise SystemExit(f"no function properties for {KERNEL} in ptxas's report")
    return {"registers": int(used.group(1)), **entry, "spilling_variants": spilling}


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| model | batch | registers | stack B | spill stores B | spill loads B | variants that spill |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        spills = "; ".join(f"{v['variant']} ({', '.join(v['kernels'][:2])}): {v['spill_store_bytes']}/"
                           f"{v['spill_load_bytes']}" for v in r["spilling_variants"]) or "none"  # fmt: skip
        lines.append(f"| {r['model']} | {r['batch']} | {r['registers']} | {r['stack_bytes']} | "
                     f"{r['spill_store_bytes']} | {r['spill_load_bytes']} | {spills} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=lambda s: s.split(","), default=["llama-3.2-1b", "qwen3-0.6b", "qwen3-8b"])
    parser.add_argument("--batch", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2, help="layers planned (0: all; the variants are the same)")
    parser.add_argument("--arch", default="9.0", help="compute capability")
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in models.PRESETS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(models.PRESETS)}")
    commit = os.environ.get("JAX_MPK_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows = []
    for model in args.models:
        for batch in args.batch:
            source, kernel_names = plan_source(model, batch, args.ctx, args.layers, args.arch, args.sms)
            row = {"model": model, "batch": batch, "ctx": args.ctx, "layers": args.layers,
                   **summarize(ptxas_report(source, args.arch), source, kernel_names)}  # fmt: skip
            print(f"{model} batch {batch}: {row['registers']} registers, {row['stack_bytes']} B stack, spill "
                  f"{row['spill_store_bytes']} B stored / {row['spill_load_bytes']} B loaded, "
                  f"{len(row['spilling_variants'])} variants spill", flush=True)  # fmt: skip
            rows.append(row)
    stem = args.out / f"registers_sm{args.arch.replace('.', '')}"
    release = re.search(r"release [\d.]+, V[\d.]+", nvcc_version())
    meta = {"commit": commit, "nvcc": release.group(0) if release else nvcc_version(), "arch": args.arch,
            "jax": jax.__version__}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=1))
    header = (f"Megakernel registers and spills (ptxas -v, the runtime's nvcc flags), sm_{args.arch.replace('.', '')}, "
              f"commit {commit}, nvcc {meta['nvcc']}, jax {meta['jax']}; decode steps of {args.layers or 'all'} layers "
              f"at ctx {args.ctx}. Spills of a variant: stores/loads in bytes.")  # fmt: skip
    stem.with_suffix(".md").write_text(markdown(rows, header))
    print(f"wrote {stem}.json, .md")


if __name__ == "__main__":
    main()
