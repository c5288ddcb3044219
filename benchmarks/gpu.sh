#!/usr/bin/env bash
# The GPU checks in one call of a few minutes, for whoever has a CUDA device:
#   1. every test marked `gpu` (the cupy and torch-CUDA backends, CUDA adapters);
#   2. bench_decompose.py --device cuda (ndlowrank on torch CUDA and cupy vs TensorLy's PyTorch backend);
#   3. bench_adapters.py --device cuda (adapter step time and peak memory vs PEFT LoRA and LyCORIS);
#   4. bench_models.py --device cuda --quick (whole real networks of realistic size vs PEFT LoRA);
#   5. bench_forms.py --device cuda (every form of an adapter's step, float32 and bfloat16: does
#      path="auto" pick the fastest on the GPU).
# The benchmarks write their `*_gpu` sections of benchmarks/RESULTS.md and plots/*_gpu.png; logs and
# copies of those go to OUTDIR.
#
# Usage, from anywhere, with the `test` and `bench` extras installed:
#   bash benchmarks/gpu.sh [OUTDIR [STEP...]]   # OUTDIR defaults to $OUT, else benchmarks/gpu-logs
# STEP names (tests, bench_decompose_gpu, bench_adapters_gpu, bench_models_gpu, bench_forms_gpu)
# run only those: the time limits of all five add up to 800 s, so a device call limited to 600 s
# runs them in two calls (say, tests and the decompose and adapters benchmarks, then the rest).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/gpu-logs}}"
only=("${@:2}")
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"

if ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh: torch sees no CUDA device; nothing to run" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    if [ ${#only[@]} -gt 0 ] && [[ ! " ${only[*]} " == *" $name "* ]]; then return; fi
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

parallel=()
if "$python" -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
step tests 200 "$python" -m pytest -m gpu -q -p no:cacheprovider "${parallel[@]}"
step bench_decompose_gpu 150 "$python" benchmarks/bench_decompose.py --device cuda
step bench_adapters_gpu 150 "$python" benchmarks/bench_adapters.py --device cuda
step bench_models_gpu 150 "$python" benchmarks/bench_models.py --device cuda --quick
step bench_forms_gpu 150 "$python" benchmarks/bench_forms.py --device cuda --quick --dtypes float32 bfloat16

cp benchmarks/RESULTS.md "$out/RESULTS.md"
cp benchmarks/plots/*_gpu.png "$out/" 2>/dev/null
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu.sh: failed: ${failed[*]}" >&2
    exit 1
fi
echo "gpu.sh: all GPU checks passed"
