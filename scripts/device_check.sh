#!/usr/bin/env bash
# One prepared accelerator check (H100/H200): about 5 minutes, at most 15; every part runs under `timeout`.
#   scripts/device_check.sh [--cpu-smoke] [OUTDIR]      (OUTDIR defaults to $OUT, else runs/device_check)
# (a) the Pallas kernel tests compiled for the device (JAXLLM_PALLAS_INTERPRET=0);
# (b) a bf16 train step of configs/llama_1b.yaml and its MFU against the bf16 matmul peak measured here;
# (c) Pallas kernels against XLA: Evoformer attention, token-dropped attention, the int8 weight matmul.
# --cpu-smoke runs the same commands with tiny shapes and interpreted kernels, to check the script on a CPU.
# Each part's output goes to OUTDIR/<part>.log and, where it has one, OUTDIR/<part>.json; a failed part is
# reported and the others still run; the exit status is 1 if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

SMOKE=()
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  SMOKE=(--cpu-smoke)
  shift
fi
OUTDIR=${1:-${OUT:-runs/device_check}}
mkdir -p "$OUTDIR"
failed=()

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s)"
  local start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    failed+=("$name (timed out after ${limit} s)")
  elif [[ $rc -ne 0 ]]; then
    failed+=("$name (exit $rc)")
  fi
}

python -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tee "$OUTDIR/devices.log"
if [[ ${#SMOKE[@]} -eq 0 ]] && ! python -c 'import jax, sys; sys.exit(jax.default_backend() == "cpu")'; then
  echo "no accelerator found; use --cpu-smoke to check this script on a CPU" >&2
  exit 2
fi

# (a) Kernel tests. Compiled on the device unless smoke-testing; the references run at full f32 precision
# so the tests' tolerances measure the kernels, not TF32 rounding in the XLA dots they are compared with.
if python -c 'import pytest' 2>/dev/null || { [[ -d ${WHEELS:-wheels} ]] &&
    pip install -q --no-index --find-links "${WHEELS:-wheels}" pytest; }; then
  interpret=0
  [[ ${#SMOKE[@]} -gt 0 ]] && interpret=1
  part kernel_tests 240 env JAXLLM_PALLAS_INTERPRET=$interpret JAX_DEFAULT_MATMUL_PRECISION=highest \
    python -m pytest -q -p no:cacheprovider tests/ops/test_evoformer_kernel.py \
    tests/ops/test_token_dropped_attention_kernel.py tests/compression/test_kernel.py
else
  echo "== kernel_tests: skipped, pytest is not installed (put its wheels in \$WHEELS or ./wheels)"
  failed+=("kernel_tests (no pytest)")
fi

# (b) The 1B train step, then the bf16 matmul peak its MFU is measured against.
part train_llama_1b 300 python scripts/bench_device.py train "${SMOKE[@]}" --steps 5 --json "$OUTDIR/train_llama_1b.json"

# (c) Kernels against XLA.
if [[ ${#SMOKE[@]} -gt 0 ]]; then
  part evoformer 300 python scripts/bench_evoformer.py --lengths 32 --rows 2 --heads 2 --head-dim 16 --pallas \
    --repeats 1 --json "$OUTDIR/evoformer.json"
else
  part evoformer 180 python scripts/bench_evoformer.py --lengths 256 512 1024 --dtype bfloat16 --repeats 5 \
    --json "$OUTDIR/evoformer.json"
fi
part kernels 150 python scripts/bench_device.py kernels "${SMOKE[@]}" --steps 10 --json "$OUTDIR/kernels.json"

if [[ ${#failed[@]} -gt 0 ]]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all parts passed; logs and JSON in $OUTDIR"
