"""Tile sizes for the Triton grouped GEMMs: a small table keyed by layer shape, then by token count.

The table is ``triton_tiles.json`` beside this module; ``tools/tune_triton.py`` fills it by timing
candidate tiles on a GPU. A shape not in the table gets ``DEFAULT_TILES``. Each entry is a list of
``[max_tokens, tiles]`` rows in ascending order: a call with ``T`` tokens uses the first row whose
``max_tokens >= T`` (the last row for anything larger). Keys read ``E8-H4096-F14336-k2-bf16``.
"""

from __future__ import annotations

import json
from pathlib import Path

from moec.kernels.triton_ops import TileConfig

TABLE_FILE = Path(__file__).with_name("triton_tiles.json")

# Untuned rows: small tiles for decode (few rows per expert), wide ones once experts get many rows.
DEFAULT_TILES: list[tuple[int, TileConfig]] = [
    (32, TileConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)),
    (512, TileConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)),
    (1 << 30, TileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)),
]


def shape_key(num_experts: int, hidden: int, intermediate: int, top_k: int, dtype: str) -> str:
    return f"E{num_experts}-H{hidden}-F{intermediate}-k{top_k}-{dtype}"


def read_table(path: Path = TABLE_FILE) -> dict[str, list[tuple[int, TileConfig]]]:
    if not path.is_file():
        return {}
    entries = json.loads(path.read_text()).get("shapes", {})
    return {key: [(int(limit), TileConfig(**tiles)) for limit, tiles in rows] for key, rows in entries.items()}


def tiles_for_shape(key: str, path: Path = TABLE_FILE) -> list[tuple[int, TileConfig]]:
    """The ``[max_tokens, tiles]`` rows for a layer shape: tuned if the table has it, else the defaults."""
    return read_table(path).get(key, DEFAULT_TILES)


def pick(rows: list[tuple[int, TileConfig]], num_tokens: int) -> TileConfig:
    for max_tokens, tiles in rows:
        if num_tokens <= max_tokens:
            return tiles
    return rows[-1][1]
