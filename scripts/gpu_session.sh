#!/usr/bin/env bash
# One device-machine session: build the extension, then any of: the GPU tests, the decode benchmark of the Flax
# examples, a per-SM trace of one step, the Llama-shaped decode_step benchmark, the per-call host overhead, the
# warm start (first call in a new process, plan cached) of a model's step, the per-task and per-level cost
# (taskcost), the decode benchmark with a knob's variant timed beside the default in one process (knob: KNOB, default
# JAX_MPK_COMM_COPIES, set to KNOB_VALUE, default 1), the differential fuzzer through the CUDA
# megakernel (fuzz: FUZZ_COUNT programs of seed 2026 from 0, default 512, in 16 parallel shards, one records file
# and one tally), the decode benchmark of another commit's tree and then of this one in one session (ab: AB_TREE,
# e.g. `git archive REV | tar -x -C ab/REV`, carried to the device machine as the git-ignored ab/), 2-layer
# profiles of other trees and then of this one (abprofile: AB_TREES, space-separated; PROFILE_CONFIGS, lines of
# "model batch [KNOB=value ...]", default Llama-1B b1 and b8, Qwen3-0.6B b8; its logs come back as abprofile.tgz). Logs and results go to $OUT.
#   JAX_MPK_COMMIT=<sha> bash scripts/gpu_session.sh [all | tests,decode,trace,bench,host,warm,taskcost,knob,fuzz,ab,abprofile,micro] [pytest -k expression]
# micro: the microbenchmarks of benchmarks/micro/ built with the flags their header gives (weight_stream also with
# JAX_MPK_READ_DEPTH=16, MICRO_FLAGS added to every build), run one after the other, a log each; MICROS
# (space-separated names, default all; name:-DFLAG=1 builds a variant) picks some; MICRO_NCU=N also profiles each
# one's first N kernels with ncu (its SASS export and scripts/ncu_summary.py's regions and top instructions).
# decode and knob: DECODE_MODELS (default llama-3.2-1b,qwen3-0.6b,qwen3-8b), DECODE_BATCH (1,8), DECODE_CTX
# (1024), DECODE_ARGS (extra arguments); trace: TRACE_ARGS (e.g. "--model llama-3.2-1b --batch 8"); warm: WARM_MODEL (qwen3-8b). "all" leaves out host, warm, taskcost, knob,
# fuzz, ab, abprofile.
# The device machine gets the working tree without .git: pass the commit.
set -uo pipefail
what=${1:-all}
select=${2:-}
OUT=${OUT:-/tmp/jax_mpk_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_MPK_CACHE_DIR=${JAX_MPK_CACHE_DIR:-/tmp/jax_mpk_cache}
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
python3 -c "import jax, jax_mpk._ext as e; print(jax.__version__, jax.devices(), 'cuda backend:', e.has_cuda())"
status=0
has() { [[ ($what == all && ,host,warm,taskcost,knob,fuzz,ab,abprofile,micro, != *,$1,*) || ,$what, == *,$1,* ]]; }
if has tests; then
  python3 -m pytest -q -m gpu tests/ -p no:cacheprovider ${select:+-k "$select"} > "$OUT/gpu_tests.log" 2>&1
  status=$?
  tail -15 "$OUT/gpu_tests.log"
fi
if has decode; then
  # shellcheck disable=SC2086
  python3 benchmarks/decode.py --models "${DECODE_MODELS:-llama-3.2-1b,qwen3-0.6b,qwen3-8b}" \
    --batch "${DECODE_BATCH:-1,8}" --ctx "${DECODE_CTX:-1024}" --out "$OUT" ${DECODE_ARGS:-} > "$OUT/decode.log" 2>&1
  grep -E "read bandwidth|^\[|agreement|=>" "$OUT/decode.log"
fi
if has trace; then
  # shellcheck disable=SC2086
  python3 benchmarks/profile_step.py --layers 2 ${TRACE_ARGS:-} --trace "$OUT/trace.json" --png "$OUT/trace.png" > "$OUT/profile.txt" 2>&1
  head -12 "$OUT/profile.txt"
fi
if has bench; then
  python3 benchmarks/decode_step.py --layers 16 --ctx 1024 --out "$OUT" > "$OUT/bench.log" 2>&1
  tail -8 "$OUT/bench.log"
fi
if has host; then
  python3 benchmarks/host_overhead.py --out "$OUT" > "$OUT/host_overhead.log" 2>&1
  tail -12 "$OUT/host_overhead.log"
fi
if has warm; then
  python3 benchmarks/warm_start.py --model "${WARM_MODEL:-qwen3-8b}" --out "$OUT" > "$OUT/warm_start.log" 2>&1
  tail -10 "$OUT/warm_start.log"
fi
if has taskcost; then
  python3 benchmarks/task_cost.py --out "$OUT/task_cost.json" > "$OUT/task_cost.log" 2>&1
  tail -6 "$OUT/task_cost.log"
fi
if has knob; then
  # the default megakernel and the one planned with KNOB=KNOB_VALUE, timed in the same process and rounds
  # (decode.py --variant: jax.jit runs once, not once per setting)
  knob=${KNOB:-JAX_MPK_COMM_COPIES}
  mkdir -p "$OUT/knob"
  # shellcheck disable=SC2086
  python3 benchmarks/decode.py --models "${DECODE_MODELS:-llama-3.2-1b,qwen3-0.6b,qwen3-8b}" \
    --batch "${DECODE_BATCH:-1,8}" --ctx "${DECODE_CTX:-1024}" --out "$OUT/knob" \
    --variant "knob:$knob=${KNOB_VALUE:-1}" ${DECODE_ARGS:-} > "$OUT/knob.log" 2>&1
  echo "$knob=${KNOB_VALUE:-1} as megakernel[knob]:"; grep -E "^\[|=>|agreement" "$OUT/knob.log"
fi
if has ab; then
  # the other tree first, this one last, so that this tree is what stays installed
  for tree in "${AB_TREE:?ab needs AB_TREE}" "$PWD"; do
    name=$([[ $tree == "$PWD" ]] && echo head || basename "$tree")
    if ! python3 -m pip install --no-build-isolation --no-deps -e "$tree" > "$OUT/build_$name.log" 2>&1; then
      tail -30 "$OUT/build_$name.log"
      continue
    fi
    mkdir -p "$OUT/ab_$name"
    # shellcheck disable=SC2086
    (cd "$tree" && JAX_MPK_CACHE_DIR="$JAX_MPK_CACHE_DIR/ab_$name" python3 benchmarks/decode.py \
      --models "${DECODE_MODELS:-llama-3.2-1b,qwen3-0.6b}" --batch "${DECODE_BATCH:-1}" --ctx "${DECODE_CTX:-1024}" \
      --out "$OUT/ab_$name" ${DECODE_ARGS:-}) > "$OUT/ab_$name.log" 2>&1
    echo "$name ($tree):"; grep -E "^\[|=>" "$OUT/ab_$name.log"
  done
fi
if has abprofile; then
  # the other trees first, this one last (it stays installed): a 2-layer profile of each configuration per tree
  for tree in ${AB_TREES:?abprofile needs AB_TREES} "$PWD"; do
    name=$([[ $tree == "$PWD" ]] && echo head || basename "$tree")
    if ! python3 -m pip install --no-build-isolation --no-deps -e "$tree" > "$OUT/build_$name.log" 2>&1; then
      tail -30 "$OUT/build_$name.log"
      continue
    fi
    while read -r model batch knobs; do
      # optional knobs after the batch (e.g. JAX_MPK_SPLIT_ATTENTION=1): set for that profile only
      log="$OUT/profile_${name}_${model}_b$batch${knobs:+_${knobs//[^A-Za-z0-9]/_}}.txt"
      # shellcheck disable=SC2086
      (cd "$tree" && env $knobs JAX_MPK_CACHE_DIR="$JAX_MPK_CACHE_DIR/abprofile_$name" python3 \
        benchmarks/profile_step.py --layers 2 --model "$model" --batch "$batch") > "$log" 2>&1
      echo "$name $model b$batch${knobs:+ $knobs}: $(grep -E "^call span" "$log")"
    done <<< "${PROFILE_CONFIGS:-llama-3.2-1b 1
llama-3.2-1b 8
qwen3-0.6b 8}"
  done
  # one archive: a device call brings back 8 files at most (session 7 lost 13 profiles to that)
  tar czf "$OUT/abprofile.tgz" -C "$OUT" $(cd "$OUT" && ls profile_*.txt build_*.log 2>/dev/null) \
    && (cd "$OUT" && rm -f profile_*.txt build_*.log)
fi
if has fuzz; then
  # 12 programs per megakernel: the cheapest nvcc time per program (docs/notes/fuzz.md)
  count=${FUZZ_COUNT:-512}
  shard=$(( (count + 15) / 16 ))
  mkdir -p "$OUT/fuzz"
  for s in $(seq 0 "$shard" $(( count - 1 ))); do
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 450 python3 -m jax_mpk.testing.fuzz --platform cuda --seed 2026 \
      --start "$s" --count $(( s + shard > count ? count - s : shard )) --batch 12 --no-shrink \
      --records "$OUT/fuzz/gpu_$s.jsonl" > "$OUT/fuzz/gpu_$s.log" 2>&1 &
  done
  wait
  cat "$OUT"/fuzz/gpu_*.jsonl > "$OUT/fuzz_gpu.jsonl"
  python3 -m jax_mpk.testing.fuzz --tally "$OUT"/fuzz/gpu_*.jsonl > "$OUT/fuzz_tally.json"
  tar czf "$OUT/fuzz_logs.tgz" -C "$OUT" fuzz && rm -r "$OUT/fuzz"
  head -12 "$OUT/fuzz_tally.json"
fi
if has micro; then
  # the nvcc flags a microbenchmark's header comment gives (test_microbenchmarks_compile builds it with them too)
  header_flags() {
    sed -n '/^\/\/   nvcc /,/\.cu /p' "$1" | sed -e 's|^//[[:space:]]*||' -e 's|\\$||' | tr '\n' ' ' \
      | sed -e 's|^nvcc ||' -e 's| benchmarks/micro/.*||'
  }
  all_micros="attention_chunk weight_stream weight_stream:-DJAX_MPK_READ_DEPTH=16 chain_under_stream l2_stage icache"
  for variant in ${MICROS:-$all_micros product_body}; do
    name=${variant%%:*} extra=${variant#"$name"} suffix=${variant#"$name":-D}
    log="$OUT/micro_${name}${extra:+_${suffix//[^A-Za-z0-9]/_}}.txt"
    # shellcheck disable=SC2046,SC2086
    if nvcc $(header_flags "benchmarks/micro/$name.cu") ${extra#:} ${MICRO_FLAGS:-} ${MICRO_NCU:+-lineinfo} \
      "benchmarks/micro/$name.cu" -o "/tmp/micro_$name" > "$log" 2>&1; then
      timeout 150 "/tmp/micro_$name" >> "$log" 2>&1 || echo "$name: exit $?" >> "$log"
      if [[ -n ${MICRO_NCU:-} ]]; then  # stall samples of its first MICRO_NCU kernels, by timed region
        report="/tmp/ncu_${log##*/}"
        timeout 300 ncu --clock-control none --launch-count "$MICRO_NCU" --section WarpStateStats \
          --section SourceCounters -f -o "${report%.txt}" "/tmp/micro_$name" > /dev/null 2>&1
        ncu --import "${report%.txt}.ncu-rep" --page source --csv --print-source sass 2> /dev/null \
          | gzip > "${log%.txt}_sass.csv.gz"
        python3 scripts/ncu_summary.py "${log%.txt}_sass.csv.gz" > "${log%.txt}_ncu.txt" 2>&1
      fi
    fi
    echo "$log:"; grep -cE "TB/s|us \(|^pause|^none" "$log"
  done
fi
echo "session: $(( $(date +%s) - start )) s"
exit $status
