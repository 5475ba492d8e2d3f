#!/usr/bin/env bash
# The checks that need a machine larger than the 2-core development one, in one go: the GPU tests (the Triton
# kernels and the CUDA-graph replays, including those marked gpu), tile tuning (written into
# moec/backend/triton_tiles.json), the benchmark with the tuned tiles, then the 4-rank gloo overlap measurement
# (tools/bench/expert_parallel.py), which needs a spare core per rank to show any overlap. Logs and results go
# to OUT_DIR. --quick: smaller tuning grid and fewer token counts; --no-tune: keep the tiles in the repository.
#
# Usage: tools/gpu_checks.sh OUT_DIR [--quick] [--no-tune]
set -u
out=${1:?usage: tools/gpu_checks.sh OUT_DIR [--quick] [--no-tune]}
shift
quick="" tune=1
for option in "$@"; do
  case $option in
    --quick) quick=--quick ;;
    --no-tune) tune=0 ;;
    *) echo "unknown option $option (usage: tools/gpu_checks.sh OUT_DIR [--quick] [--no-tune])" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
python -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__,
'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee "$out/versions.txt"
echo "== kernel tests on the GPU"
parallel=$(python -c "import xdist" 2>/dev/null && echo "-n 8")  # compiling the kernels dominates: in parallel
timeout 100 python -m pytest tests/kernels/triton tests/backend/test_cuda_graphs.py -m "not slow" -q \
  -p no:cacheprovider $parallel >"$out/tests.txt" 2>&1
tail -n 15 "$out/tests.txt"
if [ "$tune" = 1 ]; then
  echo "== tuning"
  timeout 130 python tools/tune_triton.py $quick 2>&1 | tee "$out/tune.txt" | grep -v "^  skip"
fi
cp moec/backend/triton_tiles.json "$out/"
echo "== benchmark"
timeout 280 python tools/bench/triton_moe.py $quick --profile --out "$out/triton_moe.json" >"$out/bench.txt" 2>&1
grep -v "^ \|^-\|^Name\|^Self" "$out/bench.txt" | tail -n 40
echo "== expert-parallel overlap on 4 gloo ranks ($(nproc) cores)"
timeout 90 python tools/bench/expert_parallel.py --overlap-only --out "$out/expert_parallel.json" 2>&1 \
  | grep -v "Warn" | tee "$out/expert_parallel.txt" | tail -n 3
