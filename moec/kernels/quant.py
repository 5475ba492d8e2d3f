"""Group-wise affine integer quantization in torch: pack, unpack, quantize, dequantize.

This is the reference implementation of the storage format documented in ``moec.ir.quant`` (read that
first: packing order, scale and zero-point layout). Everything here is vectorized torch; nothing loops
over rows or groups.

Shapes: a matrix ``w`` is ``[R, C]`` (a linear's (out, in) weight); ``codes`` are ``[R, C]`` integers in
``[0, 2**bits - 1]`` (uint8); ``packed`` is ``[R, C * bits // 8]`` uint8; ``scales`` (float16) and
``zeros`` (uint8) are ``[R, C // group]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moec.ir.quant import QuantizedType, check_group, storage_names

CODES_PER_CHUNK = 8  # 8 codes of b bits fill exactly b bytes, for every width


def check_bits(bits: int) -> None:
    from moec.ir.quant import SUPPORTED_BITS

    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bit width {bits} is not supported; use one of {list(SUPPORTED_BITS)}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` [R, C] (ints in [0, 2**bits)) into ``[R, C * bits // 8]`` uint8, LSB-first bit stream."""
    check_bits(bits)
    rows, columns = codes.shape
    if columns % CODES_PER_CHUNK:
        raise ValueError(f"the packed dimension {columns} must be a multiple of {CODES_PER_CHUNK}")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    chunks = codes.to(torch.int64).reshape(rows, columns // CODES_PER_CHUNK, CODES_PER_CHUNK)
    shifts = torch.arange(CODES_PER_CHUNK, dtype=torch.int64, device=codes.device) * bits
    words = (chunks << shifts).sum(dim=-1, keepdim=True)  # [R, C/8, 1]: disjoint bits, so sum == or
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    packed = (words >> byte_shifts) & 0xFF  # [R, C/8, bits]
    return packed.to(torch.uint8).reshape(rows, columns * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of ``pack_codes``: ``[R, C * bits // 8]`` uint8 -> ``[R, C]`` uint8 codes."""
    check_bits(bits)
    if bits == 8:
        return packed
    rows, num_bytes = packed.shape
    if 8 % bits == 0:  # 2 and 4 bits: no code straddles a byte, so shift bytes directly (fast uint8 ops)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, bytes, 8 // bits]
        return codes.reshape(rows, num_bytes * 8 // bits)
    chunks = packed.to(torch.int32).reshape(rows, num_bytes // bits, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int32, device=packed.device) * 8
    words = (chunks << byte_shifts).sum(dim=-1, keepdim=True, dtype=torch.int32)  # [R, C/8, 1], 24 bits used
    shifts = torch.arange(CODES_PER_CHUNK, dtype=torch.int32, device=packed.device) * bits
    codes = (words >> shifts) & ((1 << bits) - 1)  # [R, C/8, 8]
    return codes.to(torch.uint8).reshape(rows, num_bytes * 8 // bits)


def affine_params(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale (float16) and zero point (uint8) per group of ``w`` [R, C] -> [R, C // group].

    The range of each group is widened to include 0, so the zero point is an integer code.
    """
    check_bits(bits)
    check_group(group, w.shape[-1])
    grouped = w.float().reshape(*w.shape[:-1], -1, group)
    low = grouped.amin(dim=-1).clamp(max=0.0)
    high = grouped.amax(dim=-1).clamp(min=0.0)
    max_code = (1 << bits) - 1
    # Stored in float16, rounded up so the group's range always fits the codes. Below 2**-14 (8-bit groups of
    # weights with a standard deviation under about 0.004) float16 is subnormal: coarser, but far finer than
    # a floor there would be. The smallest positive float16 keeps all-zero groups exactly zero.
    exact = (high - low) / max_code
    scale = exact.to(torch.float16)
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
    scale = scale.clamp(min=torch.finfo(torch.float16).smallest_normal * 2.0**-10)
    zero = torch.round(-low / scale.float()).clamp(0, max_code).to(torch.uint8)
    return scale, zero


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``w`` [R, C] to codes [R, C] (uint8) with given per-group ``scales``/``zeros`` [R, C // group]."""
    group = w.shape[-1] // scales.shape[-1]
    scale = scales.float().repeat_interleave(group, dim=-1)
    zero = zeros.float().repeat_interleave(group, dim=-1)
    return torch.round(w.float() / scale + zero).clamp(0, (1 << bits) - 1).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale`` in float32, per group: codes [..., R, C], scales/zeros [..., R, C // group]."""
    group = codes.shape[-1] // scales.shape[-1]
    grouped = codes.float().reshape(*codes.shape[:-1], -1, group)
    out = (grouped - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return out.reshape(codes.shape)


@dataclass
class QuantizedMatrix:
    """One quantized [R, C] matrix: packed codes [R, C * bits // 8], float16 scales and uint8 zeros [R, C // group]."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int

    @property
    def rows(self) -> int:
        return self.packed.shape[-2]

    @property
    def columns(self) -> int:
        return self.packed.shape[-1] * 8 // self.bits

    @property
    def group(self) -> int:
        return self.columns // self.scales.shape[-1]

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.packed, self.bits)

    def dequantize(self) -> torch.Tensor:
        """The float32 [R, C] matrix this one stands for."""
        return dequantize_codes(self.codes(), self.scales, self.zeros)


def quantize_matrix(w: torch.Tensor, bits: int, group: int) -> QuantizedMatrix:
    """Round-to-nearest quantization of ``w`` [R, C]."""
    scales, zeros = affine_params(w, bits, group)
    return QuantizedMatrix(pack_codes(quantize_codes(w, scales, zeros, bits), bits), scales, zeros, bits)


@dataclass
class QuantizedWeight:
    """A quantized weight as stored (see ``moec.ir.quant``): its type and its three storage tensors."""

    type: QuantizedType
    qweight: torch.Tensor  # uint8 [packed_bytes]
    scales: torch.Tensor  # float16 [(E,) R, C // group]
    zeros: torch.Tensor  # uint8, like scales

    def matrix(self, index: int = 0) -> QuantizedMatrix:
        """Matrix ``index`` (an expert of a stacked weight; 0 for a 2-D weight), as views of the storage."""
        t = self.type
        start = t.matrix_offset(index)
        packed = self.qweight[start : start + t.matrix_bytes(index)].view(t.rows, -1)
        if t.rank == 3:
            return QuantizedMatrix(packed, self.scales[index], self.zeros[index], t.bits[index])
        return QuantizedMatrix(packed, self.scales, self.zeros, t.bits[0])

    def dequantize(self) -> torch.Tensor:
        """The whole weight in float32 (materializes every matrix: for tests and references only)."""
        matrices = [self.matrix(i).dequantize() for i in range(self.type.num_matrices)]
        return torch.stack(matrices) if self.type.rank == 3 else matrices[0]

    def storage(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors to save under ``name`` (safetensors names from ``moec.ir.quant.storage_names``)."""
        names = storage_names(name)
        return {names["qweight"]: self.qweight, names["scales"]: self.scales, names["zeros"]: self.zeros}

    @staticmethod
    def from_storage(name: str, type: QuantizedType, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        names = storage_names(name)
        return QuantizedWeight(type, tensors[names["qweight"]], tensors[names["scales"]], tensors[names["zeros"]])

    @staticmethod
    def from_matrices(dtype: str, shape: tuple[int, ...], matrices: list[QuantizedMatrix]) -> QuantizedWeight:
        """Assemble a weight of logical ``shape`` from its matrices (one, or one per expert)."""
        group = matrices[0].group
        type = QuantizedType(dtype, tuple(shape), tuple(m.bits for m in matrices), group)
        qweight = torch.cat([m.packed.reshape(-1) for m in matrices])
        if len(shape) == 3:
            scales = torch.stack([m.scales for m in matrices])
            zeros = torch.stack([m.zeros for m in matrices])
        else:
            scales, zeros = matrices[0].scales, matrices[0].zeros
        return QuantizedWeight(type, qweight, scales.contiguous(), zeros.contiguous())


def check_storage(name: str, type: QuantizedType, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``tensors`` hold ``name``'s storage with the shapes and dtypes of ``type``."""
    expected = {
        "qweight": (torch.uint8, (type.packed_bytes,)),
        "scales": (torch.float16, type.scale_shape),
        "zeros": (torch.uint8, type.scale_shape),
    }
    for part, tensor_name in storage_names(name).items():
        tensor = tensors.get(tensor_name)
        dtype, shape = expected[part]
        if tensor is None:
            raise ValueError(f"quantized weight @{name} lacks its storage tensor {tensor_name}")
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{tensor_name} is {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}")
