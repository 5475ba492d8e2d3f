"""The ONNX backend: a moec program exported to a .onnx file checked in onnxruntime."""

from moec.backend.onnx.export import OnnxExport, export_onnx
from moec.backend.onnx.moe import LOWERINGS

__all__ = ["LOWERINGS", "OnnxExport", "export_onnx"]
