#!/usr/bin/env bash
# One device-machine session: build the extension, run the GPU tests, then benchmark. Logs go to $OUT.
#   JAX_MPK_COMMIT=<sha> bash scripts/gpu_session.sh [all | tests,bench,profile (any of them)] [pytest -k expression]
# (the device machine gets the working tree without .git: pass the commit for the benchmark's JSON)
set -uo pipefail
what=${1:-all}
select=${2:-}
OUT=${OUT:-/tmp/jax_mpk_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_MPK_CACHE_DIR=/tmp/jax_mpk_cache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv > "$OUT/nvidia-smi.txt" 2>&1
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
python3 -c "import jax, jax_mpk._ext as e; print(jax.__version__, jax.devices(), 'cuda backend:', e.has_cuda())"
status=0
has() { [[ $what == all || ,$what, == *,$1,* ]]; }
if has tests; then
  python3 -m pytest -q -x -m gpu tests/ ${select:+-k "$select"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  status=${PIPESTATUS[0]}
fi
if has bench; then
  python3 benchmarks/decode_step.py --layers 16 --ctx 1024 --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
fi
if has profile; then
  python3 benchmarks/profile_step.py --layers 2 --ctx 1024 2>&1 | tee "$OUT/profile.txt" | tail -45
fi
exit $status
