"""Experiment trees for `gpu_session.sh abprofile` / `ab`: HEAD's files (git archive) under ab/<name>, with one
measuring change applied, each checked to apply exactly once. ab/ is git-ignored and carried to the device machine
(`run(..., carry=["ab"])`); the trees' measurements are in docs/notes/cuda_megakernel.md.

    python3 scripts/ab_trees.py landed twice      # then AB_TREES="ab/landed ab/twice" gpu_session.sh abprofile

landed: a warp-ring product waits for its whole weight tile before its dot and stamps the staged phase there, so that
  the product phase holds the dot alone, its bytes in shared memory (session 17: 2.5-3.3 us for a 64 KB tile).
twice: a ring product runs its dot twice, the staged phase stamped between the calls, so that the product phase is
  the second call, its code warm in the instruction cache (its slots then hold partial sums: values wrong, time not).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> [(file, text in HEAD, replacement)]
EXPERIMENTS: dict[str, list[tuple[str, str, str]]] = {
    "landed": [(
        "ffi/include/jax_mpk/tasks/dot.cuh",
        """  float sum[R][8] = {};
#pragma unroll 1
  for (int s = 0; s < stages; ++s) {
    asm volatile("cp.async.wait_group %0;" ::"n"(kRingSlots - 2) : "memory");
    __syncwarp();""",
        """  float sum[R][8] = {};
  asm volatile("cp.async.wait_all;" ::: "memory");  // EXPERIMENT landed: the tile in shared memory, then the clock
  __syncthreads();
  mark_phase(layout::kStampStaged);
#pragma unroll 1
  for (int s = 0; s < stages; ++s) {
    asm volatile("cp.async.wait_group %0;" ::"n"(kRingSlots - 2) : "memory");
    __syncwarp();""",
    )],
    "twice": [(
        "jax_mpk/bodies/dot.py",
        """            return (f"dot::{ring_dot}<{w_type}, {R}{shape}>(xs, {x_stride}, smem + kRingOffset, {w}, {plan.rhs_k}, "
                    f"{plan.K}, static_cast<int>(n_len), acc, {n_pad});")
""",
        """            call = (f"dot::{ring_dot}<{w_type}, {R}{shape}>(xs, {x_stride}, smem + kRingOffset, {w}, "
                    f"{plan.rhs_k}, {plan.K}, static_cast<int>(n_len), acc, {n_pad});")
            # EXPERIMENT twice: the product again, its code warm, the phase stamped between
            return f"{call} __syncthreads(); {'mark_phase(layout::kStampStaged); ' if body.profile else ''}{call}"
""",
    )],
}


def make(name: str, out: pathlib.Path) -> pathlib.Path:
    """ab/<name>: HEAD's tree with the experiment's changes (each must match HEAD's text exactly once)."""
    tree = out / name
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    for relative, old, new in EXPERIMENTS[name]:
        path = tree / relative
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{name}: {relative} holds the text to replace {text.count(old)} times, not once "
                             "(HEAD changed: update scripts/ab_trees.py)")
        path.write_text(text.replace(old, new))
    return tree


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=sorted(EXPERIMENTS))
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "ab")
    args = parser.parse_args(argv)
    for name in args.names:
        print(make(name, args.out))


if __name__ == "__main__":
    sys.exit(main())
