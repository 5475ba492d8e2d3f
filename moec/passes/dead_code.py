"""``dead-code``: remove ops whose results nobody reads, and weights no op references.

Requires: a verified graph. Ensures: every remaining op (except ops without results, which may have
effects) has a used result; ``graph.weights`` and ``program.weights`` hold only referenced weights.
In place.
"""

from __future__ import annotations

from dataclasses import dataclass

from moec.ir.program import Program
from moec.ir.quant import QuantizedType, storage_names
from moec.passes.base import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class DeadCode(Pass):
    name = "dead-code"

    def run(self, program: Program, context: PassContext) -> PassResult:
        graph = program.graph
        outputs = {id(v) for v in graph.outputs}
        removed_ops = 0
        for op in reversed(list(graph.ops)):
            if op.results and not any(r.uses or id(r) in outputs for r in op.results):
                graph.erase(op)
                removed_ops += 1
        used = graph.used_weights()
        unused = [name for name in graph.weights if name not in used]
        for name in unused:
            weight_type = graph.weights.pop(name)
            stored = storage_names(name).values() if isinstance(weight_type, QuantizedType) else [name]
            for stored_name in stored:
                program.weights.pop(stored_name, None)
        return PassResult(bool(removed_ops or unused), {"ops_removed": removed_ops, "weights_removed": len(unused)})
