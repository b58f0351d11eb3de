#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on one NVIDIA GPU, in under 8 minutes,
#   1. the attention test files, run on the GPU (LRA_TEST_PLATFORM=cuda: no fake CPU devices),
#      the Pallas flash-attention tests among them (on a GPU: the compiled Triton kernel),
#   2. `python -m lra.bench`: softmax (xla, cudnn and pallas), memory_efficient, linear,
#      performer, local, nystromformer, retnet, gla, mamba2, deltanet, gated_deltanet (both
#      chunk strategies), s5, lru at 1K/4K/16K tokens, layer and step scopes, in bfloat16
#      and in float32 (cuDNN runs in 16 bit only), with each record's sequential depth; step
#      dropout 0 for every entry, since the fused attentions have none,
#   3. a 300-step ListOps `preset=lra` run (its model and optimizer; 30 warmup steps instead
#      of 1,000, and 9,600 / 500 / 500 generated lists: one pass of 300 batches of 32),
# each part under its own time limit, and writes to $OUT (default results/bench-gpu/):
#   device.txt (nvidia-smi and jax.devices()), tests.log, bf16/ and f32/ (bench.json,
#   bench.md, bench_layer.png, bench_step.png; layer/ and step/ hold each part's files and
#   log: a part that ran out of time keeps the records it printed), listops/ (results.json,
#   metrics.jsonl, run.log) and summary.md (each part: ok, failed or timed out; seconds).
#
# Usage: scripts/gpu_check.sh [--dry_run]    (--dry_run prints the commands only)
# Environment: PYTHON (default .venv-gpu/bin/python), OUT; for a smaller run elsewhere
# GPU_CHECK_PLATFORM (cuda; cpu = a smoke run without a GPU), GPU_CHECK_TESTS (pytest
# arguments), GPU_CHECK_LENGTHS, GPU_CHECK_REPEATS, GPU_CHECK_BENCH_FLAGS and
# GPU_CHECK_LISTOPS_FLAGS (appended to the bench and ListOps commands).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv-gpu/bin/python}
OUT=${OUT:-results/bench-gpu}
PLATFORM=${GPU_CHECK_PLATFORM:-cuda}
DRY_RUN=0
[[ ${1:-} == --dry_run ]] && DRY_RUN=1

# Seconds per part: 80 + 2 x (55 + 110) + 50 = 460, with start-up under 8 minutes.
TESTS_SECONDS=80
LAYER_SECONDS=55  # per dtype
STEP_SECONDS=110  # per dtype
LISTOPS_SECONDS=50

TESTS=${GPU_CHECK_TESTS:-tests/test_attention.py tests/test_linear_attention.py \
tests/test_gated_attention.py tests/test_delta_attention.py tests/test_lowrank_attention.py \
tests/test_sparse_attention.py tests/test_hashing_attention.py tests/test_pallas_attention.py -n 4}
ENTRIES=memory_efficient,linear,performer,local,nystromformer,retnet,gla,mamba2,deltanet,\
gated_deltanet:chunk_strategy=scan,gated_deltanet:chunk_strategy=batched,s5,lru
BF16_ENTRIES=softmax:implementation=xla,softmax:implementation=cudnn,softmax:implementation=pallas,$ENTRIES
F32_ENTRIES=softmax:implementation=xla,softmax:implementation=pallas,$ENTRIES
BENCH_FLAGS="--no_baseline --lengths ${GPU_CHECK_LENGTHS:-1024,4096,16384} \
--repeats ${GPU_CHECK_REPEATS:-3} --step_dropout 0 ${GPU_CHECK_BENCH_FLAGS:-}"
LISTOPS_WORKDIR=runs/gpu-check-listops
LISTOPS_FLAGS="--config configs/listops.py:preset=lra --workdir $LISTOPS_WORKDIR \
--config.data_dir=${LRA_DATA_DIR:-$HOME/.cache/lra}/listops-gpu-check \
--config.prepare.num_train=9600 --config.prepare.num_val=500 --config.prepare.num_test=500 \
--config.num_train_steps=300 --config.warmup_steps=30 --config.eval_every=300 \
--config.checkpoint_every=300 --config.log_every=50 ${GPU_CHECK_LISTOPS_FLAGS:-}"

summary=()

# part NAME SECONDS COMMAND...: COMMAND under `timeout`, its output in $OUT/NAME.log;
# records ok / failed / timed out and its seconds for summary.md.
part() {
  local name=$1 seconds=$2
  shift 2
  if ((DRY_RUN)); then
    echo "timeout $seconds $*"
    return
  fi
  echo "== $name (at most $seconds s)" >&2
  local start=$SECONDS status state=ok
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
  status=${PIPESTATUS[0]}
  ((status == 124)) && state="timed out after $seconds s"
  ((status != 0 && status != 124)) && state="failed (exit status $status)"
  summary+=("| $name | $state | $((SECONDS - start)) |")
}

check_device() {
  if [[ ! -x $PYTHON ]]; then
    echo "error: $PYTHON not found: \`make gpu-check\` installs .venv-gpu first" >&2
    exit 2
  fi
  [[ $PLATFORM == cpu ]] && return
  local found
  found=$("$PYTHON" -c 'import importlib.util, jax
plugin = "installed" if importlib.util.find_spec("jax_cuda12_plugin") else "not installed"
print(jax.default_backend(), "| JAX sees", jax.devices(), "| jax_cuda12_plugin", plugin)' \
    2>/dev/null | tail -n 1)
  if [[ $found != gpu* ]]; then
    echo "error: no GPU. The GPU check needs an NVIDIA GPU with a CUDA 12 driver and" \
         "jax[cuda12] (make gpu-check installs it into .venv-gpu); here ${found#* | }." >&2
    command -v nvidia-smi >/dev/null || echo "(nvidia-smi is not installed either.)" >&2
    exit 3
  fi
}

write_device() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    command -v nvidia-smi >/dev/null &&
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    JAX_PLATFORMS=$PLATFORM "$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'
  } >"$OUT/device.txt" 2>&1
}

# bench DTYPE ENTRIES: the layer and step parts of one dtype, then their merged tables.
bench() {
  local dtype=$1 entries=$2 short=${1/bfloat/bf}
  short=${short/float/f}
  # shellcheck disable=SC2086  # BENCH_FLAGS is a list of flags
  part "$short/layer/bench" "$LAYER_SECONDS" env JAX_PLATFORMS="$PLATFORM" "$PYTHON" -m lra.bench \
    --attention "$entries" --dtype "$dtype" --scopes layer $BENCH_FLAGS --out "$OUT/$short/layer"
  # shellcheck disable=SC2086
  part "$short/step/bench" "$STEP_SECONDS" env JAX_PLATFORMS="$PLATFORM" "$PYTHON" -m lra.bench \
    --attention "$entries" --dtype "$dtype" --scopes step $BENCH_FLAGS --out "$OUT/$short/step"
  ((DRY_RUN)) || JAX_PLATFORMS=cpu "$PYTHON" -c '
import json, sys
from pathlib import Path
from lra.bench import output as bench_output
out = Path(sys.argv[1])
records = [r for p in ("layer", "step") if (out / p / "bench.json").is_file()
           for r in json.loads((out / p / "bench.json").read_text())]
(out / "bench.json").write_text(json.dumps(records, indent=2) + "\n")
(out / "bench.md").write_text(bench_output.markdown(records) + "\n")
bench_output.plot(records, out)' "$OUT/$short"
}

listops() {
  # shellcheck disable=SC2086  # LISTOPS_FLAGS is a list of flags
  part listops "$LISTOPS_SECONDS" env JAX_PLATFORMS="$PLATFORM" "$PYTHON" -m lra.launch $LISTOPS_FLAGS
  ((DRY_RUN)) && return
  mkdir -p "$OUT/listops"
  mv "$OUT/listops.log" "$OUT/listops/run.log"
  cp "$LISTOPS_WORKDIR"/{results.json,metrics.jsonl} "$OUT/listops/" 2>/dev/null
}

write_summary() {
  {
    echo "# GPU check"
    echo
    sed 's/^/    /' "$OUT/device.txt"
    echo
    echo "| part | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${summary[@]}"
  } >"$OUT/summary.md"
  cat "$OUT/summary.md"
}

main() {
  if ((!DRY_RUN)); then
    check_device
    rm -rf "$OUT" "$LISTOPS_WORKDIR"
    mkdir -p "$OUT"/{bf16,f32}/{layer,step}
    write_device
  fi
  # shellcheck disable=SC2086  # TESTS is a list of pytest arguments
  part tests "$TESTS_SECONDS" env LRA_TEST_PLATFORM="$PLATFORM" \
    XLA_PYTHON_CLIENT_PREALLOCATE=false "$PYTHON" -m pytest -q -p no:cacheprovider $TESTS
  bench bfloat16 "$BF16_ENTRIES"
  bench float32 "$F32_ENTRIES"
  listops
  ((DRY_RUN)) && return 0
  write_summary
  [[ ${summary[*]} != *failed* && ${summary[*]} != *"timed out"* ]]
}

main
