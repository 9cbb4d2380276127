"""One of the two processes of tests/test_multiprocess.py's runs in which process 1 is missing: with ABSENCE
"call", process 1 plans the megakernel (mapping its buffers with process 0) and never calls it, so that process 0's
call must end in the watchdog's error; with "plan", process 1 does not even plan it, so that process 0's planning
must end in the setup timeout.

    python tests/multiprocess_worker.py PROCESS_ID COORDINATOR ABSENCE

Process 0 prints one JSON line: the errors it got, how long the first took, and whether the plan's shared-memory
segments were still named in /dev/shm after the setup.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import multiprocess as example  # noqa: E402

import jax_mpk  # noqa: E402
from jax_mpk import processes  # noqa: E402


def main(process_id: int, coordinator: str, absence: str) -> None:
    example.initialize(process_id, 2, coordinator)
    mesh = example.meshes()["jax.sharding.Mesh"]
    fn, in_specs = example.row_parallel_product(mesh)
    rng = np.random.default_rng(1)
    values = [rng.uniform(-2, 2, (3, 16)).astype(np.float32), rng.uniform(-2, 2, (16, 5)).astype(np.float32)]
    args = [example.global_array(mesh, spec, v) for v, spec in zip(values, in_specs)]
    if process_id == 1:
        if absence == "call":
            jax_mpk.compile(fn, *args)  # plans it and maps its communication buffers with process 0
        return  # jax.distributed's shutdown at exit waits for process 0
    start = time.monotonic()
    try:
        plan = jax_mpk.compile(fn, *args)
    except jax_mpk.DependencyTimeoutError as error:
        print(json.dumps({"setup": str(error), "seconds": time.monotonic() - start}), flush=True)
        return
    segments = list(processes._segments.values())
    report = {"segments": segments, "named_after_setup": [s for s in segments if os.path.exists("/dev/shm" + s)]}
    start = time.monotonic()
    try:
        plan(*args)
        plan.check_errors()
    except jax_mpk.DependencyTimeoutError as error:
        report["first"] = str(error)
    report["seconds"] = time.monotonic() - start
    try:
        jax.block_until_ready(plan(*args))
    except Exception as error:  # noqa: BLE001 - reported to the test, which checks the message
        report["second"] = str(error)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
