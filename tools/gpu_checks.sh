#!/usr/bin/env bash
# The Triton backend's checks that need a CUDA GPU, in one go: the kernel tests on the GPU, tile tuning
# (written into moec/backend/triton_tiles.json), then the benchmark with the tuned tiles.
# Logs and results go to OUT_DIR. --quick: smaller tuning grid and fewer token counts.
#
# Usage: tools/gpu_checks.sh OUT_DIR [--quick]
set -u
out=${1:?usage: tools/gpu_checks.sh OUT_DIR [--quick]}
quick=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
python -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__,
'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee "$out/versions.txt"
echo "== kernel tests on the GPU"
parallel=$(python -c "import xdist" 2>/dev/null && echo "-n 8")  # compiling the kernels dominates: in parallel
timeout 80 python -m pytest tests/kernels/triton -q -p no:cacheprovider $parallel >"$out/tests.txt" 2>&1
tail -n 15 "$out/tests.txt"
echo "== tuning"
timeout 130 python tools/tune_triton.py $quick 2>&1 | tee "$out/tune.txt" | grep -v "^  skip"
cp moec/backend/triton_tiles.json "$out/"
echo "== benchmark"
timeout 220 python tools/bench/triton_moe.py $quick --profile --out "$out/triton_moe.json" >"$out/bench.txt" 2>&1
grep -v "^ \|^-\|^Name\|^Self" "$out/bench.txt" | tail -n 40
