"""Tune the tile sizes of moec's Triton grouped GEMMs on this GPU and write them into moec's tile table.

For each layer shape and each token-count bucket, every candidate ``TileConfig`` runs
``moec.kernels.triton_ops.experts`` on random bfloat16 (or --dtype) data with random routing; the fastest
(median of CUDA-event timings) becomes the bucket's row in ``moec/backend/triton_tiles.json``. Candidates
that fail to compile or run out of shared memory are skipped. Plans compiled afterwards inline the new rows.

Without a CUDA GPU (or without triton) it prints why and exits 0, changing nothing.

Run:  python tools/tune_triton.py [--shape E H F K ...] [--quick] [--table PATH]
      (default shapes: Mixtral 8x4096x14336 top-2 and fine-grained 64x2048x1408 top-6)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench.triton_moe import cuda_time_ms  # noqa: E402  (one CUDA-event timer for the tuner and the bench)

DEFAULT_SHAPES = [(8, 4096, 14336, 2), (64, 2048, 1408, 6)]
# Each bucket's row serves token counts up to its limit; the tuning runs at the limit.
BUCKETS = [1, 4, 16, 64, 256, 1024, 4096]
QUICK_BUCKETS = [1, 16, 64, 256, 1024, 4096]
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


# Candidate grids by regime. Decode: few rows per expert, so BLOCK_M is tl.dot's minimum and the weight
# stream is what matters (narrow N for more programs in flight, long K for long loads); prefill: square-ish
# tiles that feed the tensor cores.
GRIDS = {  # regime: (max tokens, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
    "decode": (16, [16], [32, 64, 128], [64, 128, 256], [1], [4], [3, 4]),
    "middle": (512, [16, 32, 64], [32, 64, 128], [64, 128], [1, 8], [4], [3, 4]),
    "prefill": (1 << 30, [64, 128], [128, 256], [64], [8], [4, 8], [3, 4]),
}
QUICK_GRIDS = {
    "decode": (16, [16], [32, 64, 128], [128, 256], [1], [4], [4]),
    "middle": (512, [16, 32, 64], [32, 64, 128], [64, 128], [8], [4], [4]),
    "prefill": (1 << 30, [64, 128], [128], [64], [8], [8], [3, 4]),
}


def candidates(tokens: int, quick: bool):
    from moec.kernels.triton_ops import TileConfig

    grids = QUICK_GRIDS if quick else GRIDS
    _, *axes = next(grid for grid in grids.values() if tokens <= grid[0])
    for m, n, k, g, w, s in itertools.product(*axes):
        yield TileConfig(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=g, num_warps=w, num_stages=s)


def tune_shape(num_experts: int, hidden: int, ffn: int, top_k: int, dtype: torch.dtype, quick: bool):
    from moec.frontend.blocks import ExpertsSpec
    from moec.kernels import triton_ops

    spec = ExpertsSpec(num_experts, hidden, ffn, "silu", gated=True)
    generator = torch.Generator(device="cuda").manual_seed(0)
    w_in = torch.randn(num_experts, 2 * ffn, hidden, generator=generator, device="cuda").to(dtype) * 0.02
    w_out = torch.randn(num_experts, hidden, ffn, generator=generator, device="cuda").to(dtype) * 0.02
    rows = []
    for tokens in QUICK_BUCKETS if quick else BUCKETS:
        x = torch.randn(tokens, hidden, generator=generator, device="cuda").to(dtype)
        indices = torch.rand(tokens, num_experts, generator=generator, device="cuda").topk(top_k, dim=-1).indices
        weights = torch.full((tokens, top_k), 1.0 / top_k, device="cuda")
        best, best_ms = None, float("inf")
        for tiles in candidates(tokens, quick):
            def run(tiles=tiles, x=x, indices=indices, weights=weights):
                return triton_ops.experts(x, indices, weights, w_in, w_out, None, None, spec, tiles)

            try:
                ms = cuda_time_ms(run, repeats=20, warmup=1)
            except Exception as err:  # out of resources, or a tile the compiler rejects: not a candidate here
                print(f"  skip {tiles}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
                continue
            if ms < best_ms:
                best, best_ms = tiles, ms
        if best is None:
            raise SystemExit(f"no candidate tile ran for E{num_experts} H{hidden} F{ffn} k{top_k} T={tokens}; "
                             "the errors are above")
        print(f"E{num_experts} H{hidden} F{ffn} k{top_k} T<={tokens}: {best_ms:.3f} ms with {best}")
        rows.append([tokens, best.__dict__])
    rows[-1][0] = 1 << 30  # the last row serves every larger count
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=4, type=int, action="append", metavar=("E", "H", "F", "K"),
                        help="experts, hidden, FFN width, top-k (repeatable)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_NAMES))
    parser.add_argument("--quick", action="store_true", help="fewer token buckets and a smaller candidate grid")
    parser.add_argument("--table", type=Path, help="the table to update (default: moec's own)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU; the tile table is unchanged")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("skipped: triton is not installed (pip install -e '.[triton]')")
        return 0
    from moec.backend.triton_tiles import TABLE_FILE, shape_key

    table_file = args.table or TABLE_FILE
    table = json.loads(table_file.read_text()) if table_file.is_file() else {"shapes": {}}
    dtype = getattr(torch, args.dtype)
    for num_experts, hidden, ffn, top_k in args.shape or DEFAULT_SHAPES:
        key = shape_key(num_experts, hidden, ffn, top_k, DTYPE_NAMES[args.dtype])
        table.setdefault("shapes", {})[key] = tune_shape(num_experts, hidden, ffn, top_k, dtype, args.quick)
        table_file.write_text(json.dumps(table, indent=1) + "\n")  # after each shape: a long run keeps its work
        print(f"wrote {key} to {table_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
