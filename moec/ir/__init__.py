"""moec's MoE-aware IR: typed SSA graphs, a text form that round-trips, and a verifier."""

from moec.ir.core import Graph, Operation, Use, Value, WeightRef
from moec.ir.ops import AtenOp, DenseFFNOp, ExpertsOp, RouteOp, SharedExpertOp
from moec.ir.parser import parse_graph
from moec.ir.printer import print_graph
from moec.ir.types import IndexType, TensorType
from moec.ir.verifier import verify

__all__ = [
    "AtenOp", "DenseFFNOp", "ExpertsOp", "Graph", "IndexType", "Operation", "RouteOp", "SharedExpertOp",
    "TensorType", "Use", "Value", "WeightRef", "parse_graph", "print_graph", "verify",
]
