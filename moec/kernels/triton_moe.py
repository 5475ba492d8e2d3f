"""Triton kernels for MoE layers: router top-k, token-to-expert alignment, fused grouped GEMMs.

Device code only, and self-contained (it imports nothing but triton): the Triton backend copies this file
verbatim into each plan's generated kernel source. Host wrappers that check, allocate and launch live in
:mod:`moec.kernels.triton_ops`; plain-torch references in :mod:`moec.kernels.triton_reference`.

The method (after vLLM's fused MoE): the T*k (token, slot) *pairs* are grouped by expert and each expert's
group is padded to a multiple of ``BLOCK_M`` (``align_kernel``), so every BLOCK_M-row tile of the grouped
GEMMs belongs to one expert. A tile gathers its token rows straight from ``x`` by pair id (no permuted copy
of the activations), multiplies by that expert's weight tile, and scatters its result to the pair's row.
Experts with no tokens own no tiles, so their weights are never read.

Pair ``p`` is token ``p // TOP_K``, slot ``p % TOP_K``; padding slots hold the sentinel ``num_pairs``. A pair
whose expert index is negative (skipped at run time) is left out of the alignment, so no tile computes it.
"""

import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# Activations (the names of moec.frontend.blocks.ACTIVATIONS), in float32
# ----------------------------------------------------------------------------------------------


@triton.jit
def apply_activation(x, ACT: tl.constexpr):
    if ACT == "silu":
        return x * tl.sigmoid(x)
    elif ACT == "gelu":  # erf form
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == "gelu_tanh":  # tanh(z) = 2 sigmoid(2z) - 1
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (2.0 * tl.sigmoid(2.0 * inner))
    elif ACT == "relu":
        return tl.maximum(x, 0.0)
    elif ACT == "relu2":
        positive = tl.maximum(x, 0.0)
        return positive * positive
    else:  # quick_gelu
        return x * tl.sigmoid(1.702 * x)


# ----------------------------------------------------------------------------------------------
# Router: logits, scoring, top-k, renormalization
# ----------------------------------------------------------------------------------------------


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to the 16-bit ``dtype`` (to nearest, ties to even), as float32. bfloat16 by its
    bits: Triton's interpreter truncates a cast to bfloat16 (finite values only)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(dtype).to(tl.float32)


@triton.jit
def router_topk_kernel(
    # Pointers
    x_ptr,  # [T, HIDDEN]        any float dtype, rows contiguous
    router_ptr,  # [E, HIDDEN]   any float dtype, contiguous
    bias_ptr,  # [E]             choice bias (only read when HAS_BIAS)
    logit_bias_ptr,  # [E]       the router's own bias, added to the logits (only read when HAS_LOGIT_BIAS)
    indices_ptr,  # [T, TOP_K]   int64 out: chosen experts, best first
    weights_ptr,  # [T, TOP_K]   float32 out: routing weights
    # Sizes
    num_tokens,
    # Configuration
    HIDDEN: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    SCORING: tl.constexpr,  # "softmax" | "sigmoid"
    SCORE_FIRST: tl.constexpr,  # True: score all experts, then choose; False: choose on logits, score the k
    RENORMALIZE: tl.constexpr,
    RENORM_EPS: tl.constexpr,
    SCALING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LOGIT_BIAS: tl.constexpr,
    ROUND_LOGITS: tl.constexpr,  # round the logits to x's dtype (RouteSpec.round_logits)
    # Tiles
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_E: tl.constexpr,  # next power of two >= NUM_EXPERTS (>= 16 for tl.dot)
    BLOCK_H: tl.constexpr,
    BLOCK_KS: tl.constexpr,  # next power of two >= TOP_K
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    expert_ok = experts < NUM_EXPERTS

    # logits = x @ router.T in float32 (exact, not tf32: a flipped choice changes the output a lot)
    logits = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for h0 in range(0, HIDDEN, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + rows[:, None] * HIDDEN + cols[None, :],
                    mask=row_ok[:, None] & (cols[None, :] < HIDDEN), other=0.0)
        w = tl.load(router_ptr + experts[None, :] * HIDDEN + cols[:, None],
                    mask=expert_ok[None, :] & (cols[:, None] < HIDDEN), other=0.0)  # [BLOCK_H, BLOCK_E]
        logits = tl.dot(x.to(tl.float32), w.to(tl.float32), logits, input_precision="ieee")
    if HAS_LOGIT_BIAS:
        logits = logits + tl.load(logit_bias_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)[None, :]
    if ROUND_LOGITS:
        logits = round_to(logits, x_ptr.dtype.element_ty)
    logits = tl.where(expert_ok[None, :], logits, float("-inf"))

    if SCORE_FIRST:
        if SCORING == "softmax":
            shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
            scores = shifted / tl.sum(shifted, axis=1)[:, None]
        else:
            scores = tl.sigmoid(logits)
        choice = scores
    else:
        scores = logits  # scored after the choice, over the k chosen logits only
        choice = logits
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(expert_ok[None, :], choice, float("-inf"))

    # top-k by repeated argmax; chosen[t, j] is the score (or logit) of the j-th best expert
    slots = tl.arange(0, BLOCK_KS)
    chosen = tl.zeros([BLOCK_T, BLOCK_KS], dtype=tl.float32)
    chosen_ids = tl.zeros([BLOCK_T, BLOCK_KS], dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(choice, axis=1)  # [BLOCK_T]
        hit = experts[None, :] == best[:, None]
        value = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        chosen = tl.where(slots[None, :] == j, value[:, None], chosen)
        chosen_ids = tl.where(slots[None, :] == j, best[:, None].to(tl.int64), chosen_ids)
        choice = tl.where(hit, float("-inf"), choice)

    slot_ok = slots[None, :] < TOP_K
    if not SCORE_FIRST:
        if SCORING == "softmax":
            top = tl.where(slot_ok, chosen, float("-inf"))
            shifted = tl.exp(top - tl.max(top, axis=1)[:, None])
            chosen = shifted / tl.sum(shifted, axis=1)[:, None]
        else:
            chosen = tl.sigmoid(chosen)
    if RENORMALIZE:
        total = tl.sum(tl.where(slot_ok, chosen, 0.0), axis=1)
        chosen = chosen / (total[:, None] + RENORM_EPS)
    if SCALING != 1.0:
        chosen = chosen * SCALING

    out = rows[:, None] * TOP_K + slots[None, :]
    out_ok = row_ok[:, None] & slot_ok
    tl.store(indices_ptr + out, chosen_ids, mask=out_ok)
    tl.store(weights_ptr + out, chosen, mask=out_ok)


# ----------------------------------------------------------------------------------------------
# Alignment: group (token, slot) pairs by expert, each group padded to a multiple of BLOCK_M
# ----------------------------------------------------------------------------------------------


@triton.jit
def align_kernel(
    indices_ptr,  # [num_pairs] int64: expert of each pair (negative: a skipped pair, left out)
    sorted_pairs_ptr,  # [max_padded] int32 out: pair ids grouped by expert, each group padded with num_pairs
    block_experts_ptr,  # [max_padded // BLOCK_M] int32 out: the expert of each BLOCK_M tile
    padded_total_ptr,  # [1] int32 out: used length of sorted_pairs (a multiple of BLOCK_M)
    num_pairs,
    NUM_EXPERTS: tl.constexpr,
    BLOCK_E: tl.constexpr,  # next power of two >= NUM_EXPERTS
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,  # pairs scanned per step when writing
    COUNT_BLOCK: tl.constexpr,  # pairs scanned per step when counting (BLOCK_E x COUNT_BLOCK compares)
):
    """One program per expert: count every expert's pairs (each program alike, so one launch does it all),
    then write this expert's pairs (ascending, so stable), its padding and its tiles' expert id. Past the
    used length nothing is written: the GEMMs never read there."""
    expert = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for scan in range(0, num_pairs, COUNT_BLOCK):
        offsets = scan + tl.arange(0, COUNT_BLOCK)
        ids = tl.load(indices_ptr + offsets, mask=offsets < num_pairs, other=-1)
        counts += tl.sum((ids[None, :] == experts[:, None]).to(tl.int32), axis=1)
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    start = tl.sum(tl.where(experts < expert, padded, 0), axis=0)
    own = tl.sum(tl.where(experts == expert, padded, 0), axis=0)
    padding = start + tl.sum(tl.where(experts == expert, counts, 0), axis=0) + tl.arange(0, BLOCK_M)
    tl.store(sorted_pairs_ptr + padding, num_pairs, mask=padding < start + own)
    if expert == 0:
        tl.store(padded_total_ptr, tl.sum(padded, axis=0))
    for tile in range(start // BLOCK_M, (start + own) // BLOCK_M):
        tl.store(block_experts_ptr + tile, expert)

    written = start
    for scan in range(0, num_pairs, BLOCK):
        offsets = scan + tl.arange(0, BLOCK)
        ids = tl.load(indices_ptr + offsets, mask=offsets < num_pairs, other=-1)
        hit = (ids == expert).to(tl.int32)
        position = written + tl.cumsum(hit, axis=0) - 1
        tl.store(sorted_pairs_ptr + position, offsets, mask=hit == 1)
        written += tl.sum(hit, axis=0)


# ----------------------------------------------------------------------------------------------
# Grouped GEMMs over aligned tiles
# ----------------------------------------------------------------------------------------------


@triton.jit
def tile_coordinates(num_tiles_m, N: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M tile rows at a time so their weight tiles stay in L2
    (the ordering of the Triton matmul tutorial)."""
    pid = tl.program_id(0)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    return tile_m, tile_n


@triton.jit
def tile_operands(tile_m, tile_n, block_experts_ptr, sorted_pairs_ptr, num_pairs, N: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A grouped-GEMM tile's expert, its BLOCK_M pair ids (padding holds ``num_pairs``) and which are real,
    and its BLOCK_N output columns of N and which are in range."""
    expert = tl.load(block_experts_ptr + tile_m).to(tl.int64)
    pairs = tl.load(sorted_pairs_ptr + tile_m * BLOCK_M + tl.arange(0, BLOCK_M))
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, pairs, pairs < num_pairs, cols, cols < N


@triton.jit
def load_weight_tile(
    w_ptr,  # [E, ROWS, COLS] plain weights (read when FORMAT is "plain")
    q_ptr,  # uint8, 1-D: packed codes of every expert's matrix (moec's quantized weight format, version 1)
    scales_ptr,  # [E, ROWS, COLS // GROUP] float16
    zeros_ptr,  # [E, ROWS, COLS // GROUP] uint8
    bits_ptr,  # [E] int32: each expert's code width (2, 3, 4 or 8), read when FORMAT is "mixed"
    offsets_ptr,  # [E] int64: where each expert's matrix starts in q_ptr, read when FORMAT is "mixed"
    expert,
    rows,  # [BLOCK_N] row indices of the tile
    row_ok,  # [BLOCK_N]
    k0,  # first column of the tile (the reduced dim)
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    FORMAT: tl.constexpr,  # "plain" | "int4" | "int8" (every expert that width) | "mixed" (a width per expert)
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The tile ``w[expert][rows, k0:k0 + BLOCK_K]`` transposed to [BLOCK_K, BLOCK_N] (the right operand of
    tl.dot); quantized formats give it in float32.

    Quantized: code c of a row is bits [c*b, (c+1)*b) of the row's little-endian bit stream (LSB first),
    rows are COLS*b/8 bytes, and w = (code - zero) * scale per group of GROUP columns. "int4"/"int8" read
    whole bytes along the row (wide loads); "mixed" extracts each code by its expert's width, reading a
    second byte only for codes that straddle two (3-bit widths).
    """
    ks = k0 + tl.arange(0, BLOCK_K)
    mask = (ks[:, None] < COLS) & row_ok[None, :]
    # One branch only is compiled (FORMAT is a constexpr); the unused pointers are stand-ins of other types.
    if FORMAT == "plain":
        tile = tl.load(w_ptr + expert * ROWS * COLS + rows[None, :] * COLS + ks[:, None], mask=mask, other=0.0)
    elif FORMAT == "mixed":
        bits = tl.load(bits_ptr + expert)
        first_bit = ks[:, None] * bits
        shift = first_bit % 8
        byte = tl.load(offsets_ptr + expert) + rows[None, :].to(tl.int64) * (COLS * bits // 8) + first_bit // 8
        low = tl.load(q_ptr + byte, mask=mask, other=0).to(tl.int32)
        high = tl.load(q_ptr + byte + 1, mask=mask & (shift + bits > 8), other=0).to(tl.int32)
        code = ((low | (high << 8)) >> shift) & ((1 << bits) - 1)
        group = (expert * ROWS + rows[None, :]) * (COLS // GROUP) + ks[:, None] // GROUP
        scale = tl.load(scales_ptr + group, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group, mask=mask, other=0).to(tl.float32)
        tile = (code.to(tl.float32) - zero) * scale
    else:
        ROW_BYTES: tl.constexpr = COLS // 2 if FORMAT == "int4" else COLS
        row_start = q_ptr + expert * (ROWS * ROW_BYTES) + rows[None, :].to(tl.int64) * ROW_BYTES
        if FORMAT == "int8":
            codes = tl.load(row_start + ks[:, None], mask=mask, other=0)
        else:  # byte i holds code 2i (low nibble) and code 2i + 1 (high nibble)
            byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(row_start + byte_cols[:, None], mask=(byte_cols[:, None] < ROW_BYTES) & row_ok[None, :],
                             other=0)
            codes = tl.reshape(tl.permute(tl.join(packed & 0xF, packed >> 4), (0, 2, 1)), (BLOCK_K, BLOCK_N))
        tile = dequantize_tile(codes, scales_ptr, zeros_ptr, expert, rows, row_ok, k0, ROWS, COLS, GROUP,
                               BLOCK_K, BLOCK_N)
    return tile


@triton.jit
def dequantize_tile(codes, scales_ptr, zeros_ptr, expert, rows, row_ok, k0, ROWS: tl.constexpr, COLS: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """(codes - zero) * scale in float32 for a [BLOCK_K, BLOCK_N] tile of codes starting at column k0: one
    scale and zero per row and GROUP columns, loaded once per group rather than once per code."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1  # groups the tile spans
    group_cols = k0 // GROUP + tl.arange(0, GROUPS)
    at = (expert * ROWS + rows[None, :]) * (COLS // GROUP) + group_cols[:, None]  # [GROUPS, BLOCK_N]
    group_ok = (group_cols[:, None] < COLS // GROUP) & row_ok[None, :]
    scale = tl.load(scales_ptr + at, mask=group_ok, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + at, mask=group_ok, other=0).to(tl.float32)
    grouped = tl.reshape(codes.to(tl.float32), (GROUPS, BLOCK_K // GROUPS, BLOCK_N))
    return tl.reshape((grouped - zero[:, None, :]) * scale[:, None, :], (BLOCK_K, BLOCK_N))


@triton.jit
def multiply_accumulate(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b in float32. PRECISION "ieee" multiplies in full float32 (float32 plans, where Triton's
    default is tf32; and the interpreter, whose bfloat16 dot is wrong: products of bfloat16 values are exact
    in float32, so this is the tensor-core result); "tf32" keeps a and b in their dtype for the tensor cores."""
    if PRECISION == "ieee":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def gate_up_kernel(
    # Pointers
    x_ptr,  # [T, HIDDEN]              activations, rows contiguous
    w_in_ptr,  # [E, F_IN, HIDDEN]     F_IN = 2*INTERMEDIATE when gated (gate rows, then up rows)
    w_in_q_ptr, w_in_scales_ptr, w_in_zeros_ptr, w_in_bits_ptr, w_in_offsets_ptr,  # when W_IN_FORMAT is quantized
    b_in_ptr,  # [E, F_IN]             only read when HAS_BIAS
    h_ptr,  # [num_pairs, INTERMEDIATE] out, x's dtype: act(gate) * up per pair (see LIMIT)
    sorted_pairs_ptr,  # [max_padded] int32
    block_experts_ptr,  # [max_padded // BLOCK_M] int32
    padded_total_ptr,  # [1] int32
    # Sizes
    num_pairs,
    num_tiles_m,  # max_padded // BLOCK_M (the grid's row extent)
    # Configuration
    HIDDEN: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    LIMIT: tl.constexpr,  # gated: clamp gate to <= LIMIT and up to [-LIMIT, LIMIT] first; 0.0: no clamp
    UP_OFFSET: tl.constexpr,  # gated: added to up after the clamp
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,  # see multiply_accumulate
    W_IN_FORMAT: tl.constexpr,  # see load_weight_tile
    GROUP: tl.constexpr,  # quantization group size
    # Tiles
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tile_m, tile_n = tile_coordinates(num_tiles_m, INTERMEDIATE, BLOCK_N, GROUP_M)
    if tile_m * BLOCK_M >= tl.load(padded_total_ptr):
        return
    expert, pairs, pair_ok, cols, col_ok = tile_operands(tile_m, tile_n, block_experts_ptr, sorted_pairs_ptr,
                                                         num_pairs, INTERMEDIATE, BLOCK_M, BLOCK_N)
    tokens = (pairs // TOP_K).to(tl.int64)
    F_IN: tl.constexpr = 2 * INTERMEDIATE if GATED else INTERMEDIATE

    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + tokens[:, None] * HIDDEN + ks[None, :], mask=pair_ok[:, None] & (ks[None, :] < HIDDEN),
                    other=0.0)
        w_gate = load_weight_tile(w_in_ptr, w_in_q_ptr, w_in_scales_ptr, w_in_zeros_ptr, w_in_bits_ptr,
                                  w_in_offsets_ptr, expert, cols, col_ok, k0, F_IN, HIDDEN, W_IN_FORMAT, GROUP,
                                  BLOCK_K, BLOCK_N)
        acc_gate = multiply_accumulate(a, w_gate.to(a.dtype), acc_gate, PRECISION)
        if GATED:
            w_up = load_weight_tile(w_in_ptr, w_in_q_ptr, w_in_scales_ptr, w_in_zeros_ptr, w_in_bits_ptr,
                                    w_in_offsets_ptr, expert, INTERMEDIATE + cols, col_ok, k0, F_IN, HIDDEN,
                                    W_IN_FORMAT, GROUP, BLOCK_K, BLOCK_N)
            acc_up = multiply_accumulate(a, w_up.to(a.dtype), acc_up, PRECISION)

    if HAS_BIAS:
        b_expert = b_in_ptr + expert * F_IN
        acc_gate += tl.load(b_expert + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_expert + INTERMEDIATE + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED and LIMIT > 0.0:
        acc_gate = tl.minimum(acc_gate, LIMIT)
        acc_up = tl.minimum(tl.maximum(acc_up, -LIMIT), LIMIT)
    hidden = apply_activation(acc_gate, ACT)
    if GATED:
        hidden = hidden * (acc_up + UP_OFFSET)
    h_ptrs = h_ptr + pairs.to(tl.int64)[:, None] * INTERMEDIATE + cols[None, :]
    tl.store(h_ptrs, hidden.to(h_ptr.dtype.element_ty), mask=pair_ok[:, None] & col_ok[None, :])


@triton.jit
def down_kernel(
    # Pointers
    h_ptr,  # [num_pairs, INTERMEDIATE]  gate_up_kernel's output
    w_out_ptr,  # [E, HIDDEN, INTERMEDIATE]
    w_out_q_ptr, w_out_scales_ptr, w_out_zeros_ptr, w_out_bits_ptr, w_out_offsets_ptr,  # when W_OUT_FORMAT is quantized
    b_out_ptr,  # [E, HIDDEN]            only read when HAS_BIAS
    routing_ptr,  # [num_pairs] float32  routing weight of each pair
    y_ptr,  # [num_pairs, HIDDEN] out, x's dtype: routing weight * expert output, per pair
    sorted_pairs_ptr,
    block_experts_ptr,
    padded_total_ptr,
    # Sizes
    num_pairs,
    num_tiles_m,
    # Configuration
    HIDDEN: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    W_OUT_FORMAT: tl.constexpr,
    GROUP: tl.constexpr,
    # Tiles
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tile_m, tile_n = tile_coordinates(num_tiles_m, HIDDEN, BLOCK_N, GROUP_M)
    if tile_m * BLOCK_M >= tl.load(padded_total_ptr):
        return
    expert, pairs, pair_ok, cols, col_ok = tile_operands(tile_m, tile_n, block_experts_ptr, sorted_pairs_ptr,
                                                         num_pairs, HIDDEN, BLOCK_M, BLOCK_N)
    rows = pairs.to(tl.int64)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, INTERMEDIATE, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(h_ptr + rows[:, None] * INTERMEDIATE + ks[None, :],
                    mask=pair_ok[:, None] & (ks[None, :] < INTERMEDIATE), other=0.0)
        w = load_weight_tile(w_out_ptr, w_out_q_ptr, w_out_scales_ptr, w_out_zeros_ptr, w_out_bits_ptr,
                             w_out_offsets_ptr, expert, cols, col_ok, k0, HIDDEN, INTERMEDIATE, W_OUT_FORMAT, GROUP,
                             BLOCK_K, BLOCK_N)
        acc = multiply_accumulate(a, w.to(a.dtype), acc, PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_out_ptr + expert * HIDDEN + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc * tl.load(routing_ptr + rows, mask=pair_ok, other=0.0)[:, None]
    y_ptrs = y_ptr + rows[:, None] * HIDDEN + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=pair_ok[:, None] & col_ok[None, :])
