"""The expert-parallel runtime: one process per rank (torch.distributed), each holding only its own
experts, running a plan's forward with the placement and overlap schedule stored in the plan.

The plan's ``metadata["expert_parallel"]`` (written by the ``expert-placement`` and ``overlap-schedule``
passes) holds ``world_size``, ``placement`` (``moec.analysis.placement.Placement`` JSON) and
``schedule`` (per block, ``moec.analysis.schedule.LayerSchedule`` JSON). Every rank takes its share of
the batch (dim 0 of every input) and runs the graph like the torch runner, except ``moe.experts``:

1. each (token, slot) pair goes to the rank that owns its expert, sorted by that expert; the pair
   counts per chunk and destination expert are exchanged first (one small blocking all-to-all), so
   the owner knows which expert every row it receives is for,
2. each chunk's token rows are dispatched with one asynchronous ``all_to_all_single``; the block's
   shared expert runs while the first dispatches are in flight,
3. the owner runs its experts on what it received and sends the outputs back (combine, asynchronous),
4. the sender scales each returned row by its routing weight and sums it into its token.

gloo supports ``all_to_all_single`` (also uneven and asynchronous) on CPU tensors in torch 2.13, so the
exchange uses it directly. Errors found while loading are agreed on by every rank (one all-gather of
their messages) before any other collective, so a bad plan makes every rank raise, with one message, instead
of some waiting forever.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import safetensors
import torch
import torch.distributed as dist

from moec.analysis.placement import Placement, idle_ranks, placement_mismatch
from moec.analysis.schedule import LayerSchedule
from moec.backend.torch_runner import TorchRunner
from moec.errors import BackendError, MoecError, PlanError
from moec.frontend.blocks import ExpertsSpec
from moec.ir.core import Graph
from moec.ir.ops import ExpertsOp, SharedExpertOp
from moec.ir.parser import parse_graph
from moec.ir.plan import WEIGHTS_FILE, read_plan_json
from moec.ir.program import Program
from moec.ir.quant import QuantizedType
from moec.ir.types import TensorType
from moec.ir.verifier import verify
from moec.kernels import reference
from moec.kernels.moe_cpu import experts_forward
from moec.kernels.skip import skipped_pairs

EXPERT_ROLES = ("w_in", "w_out", "b_in", "b_out")


def agree(error: MoecError | None, group: Any = None) -> None:
    """Raise on every rank if any rank hit an error, with the same message on every rank: each rank's own error
    when every rank hit one with the same message, else a ``BackendError`` giving each failed rank's message
    after its rank."""
    messages: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else str(error), group=group)
    failed = {rank: message for rank, message in enumerate(messages) if message is not None}
    if not failed:
        return
    if error is not None and len(failed) == len(messages) and len(set(failed.values())) == 1:
        raise error
    lines = "".join(f"\n  rank {rank}: {message}" for rank, message in failed.items())
    raise BackendError(f"{len(failed)} of {len(messages)} ranks failed:{lines}") from error


def runtime_refusal(graph: Graph) -> str | None:
    """What in ``graph`` this runtime does not run, described (quantized weights; experts merged with router
    ``members``, which several router experts share; a 0-d output, which no rank's share of the batch holds),
    or None."""
    quantized = [name for name, weight_type in graph.weights.items() if isinstance(weight_type, QuantizedType)]
    if quantized:
        return f"quantized weights ({quantized[0]})"
    shared = [op.block for op in graph.ops_of(ExpertsOp) if op.expert_map is not None]
    if shared:
        return (f"experts of MoE block {shared[0]!r} that several router experts share (expert-merge with router "
                "'members')")
    scalars = [i for i, value in enumerate(graph.outputs) if isinstance(value.type, TensorType) and not value.type.rank]
    if scalars:  # every rank runs a share of the batch, and only rows can be gathered back into one
        return (f"a 0-d output (output {scalars[0]}: one value for the whole batch, such as the loss a model returns "
                "when given labels; compile without labels)")
    return None


def load_rank_program(path: str | os.PathLike, rank: int, world_size: int) -> tuple[Program, dict[str, Any]]:
    """The plan's program with only ``rank``'s experts loaded (sliced from the safetensors file, so the
    other ranks' experts are never read), and its expert-parallel metadata."""
    folder, plan = read_plan_json(path)
    settings = plan.get("metadata", {}).get("expert_parallel")
    if not settings or "placement" not in settings:
        raise PlanError(f"{folder} has no expert placement; run the expert-placement pass before distributing it")
    placement = Placement.from_json(settings["placement"])
    if placement.world_size != world_size:
        num_experts = min((len(row) for row in placement.ranks), default=world_size)
        replace = (f"place it again for {world_size} ranks" if world_size <= num_experts else
                   f"its layers' {num_experts} experts can be placed on at most {num_experts} ranks")
        raise PlanError(f"{folder} was placed for {placement.world_size} ranks but was started with {world_size}; "
                        f"start it with --nproc-per-node {placement.world_size} ({replace})")
    graph = parse_graph(plan["ir"])
    verify(graph)
    expert_slices: dict[str, list[int]] = {}
    unsupported = runtime_refusal(graph)
    if unsupported is not None:
        raise PlanError(f"{folder} has {unsupported}, which the expert-parallel runtime does not run; distribute "
                        "a plan without them, or run this one in one process (moec.load)")
    mismatch = placement_mismatch(placement, graph)
    if mismatch is not None:
        raise PlanError(f"{folder}: {mismatch}; a pass changed the experts after expert-placement: run "
                        "expert-placement after the passes that prune, merge or convert experts")
    idle = idle_ranks(placement)
    if idle:
        layer, ranks = next(iter(idle.items()))
        raise PlanError(f"{folder}: its expert placement gives rank(s) {ranks} no expert of MoE block {layer!r} "
                        f"({len(idle)} block(s) so); every rank needs one: place the plan's experts again "
                        "(expert-placement)")
    for op in graph.ops_of(ExpertsOp):
        local = placement.local_experts(op.block, rank)
        for role in EXPERT_ROLES:
            ref = op.weight(role)
            if ref is not None:
                expert_slices[ref.name] = local
    weights = {}
    with safetensors.safe_open(str(folder / WEIGHTS_FILE), framework="pt") as file:
        for name in graph.used_weights():
            if name in expert_slices:
                stored = file.get_slice(name)
                weights[name] = torch.cat([stored[e:e + 1] for e in expert_slices[name]])
            else:
                weights[name] = file.get_tensor(name)
    return Program(graph, weights, plan["in_spec"], plan["out_spec"], plan.get("metadata", {})), settings


class ExpertParallelRunner(TorchRunner):
    """Runs one rank's share of a plan; every rank of the default process group must run it together."""

    def __init__(self, path: str | os.PathLike) -> None:
        if not dist.is_initialized():
            raise BackendError("the expert-parallel runtime needs torch.distributed initialized (start it with torchrun)")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        error = None
        try:
            program, settings = load_rank_program(path, self.rank, self.world_size)
        except MoecError as err:
            error = err
        agree(error)
        self.placement = Placement.from_json(settings["placement"])
        self.schedules = {block: LayerSchedule.from_json(data) for block, data in settings.get("schedule", {}).items()}
        self.shared_of = {}  # experts op -> the shared expert of its block reading the same input
        for op in program.graph.ops_of(SharedExpertOp):
            for experts in program.graph.ops_of(ExpertsOp):
                if experts.block == op.block and experts.args[0] is op.args[0]:
                    self.shared_of[id(experts)] = op
        self.early_results: dict[int, torch.Tensor] = {}
        super().__init__(program)

    def prepare(self, op):
        step = super().prepare(op) if not isinstance(op, ExpertsOp) else None
        if isinstance(op, SharedExpertOp):
            return lambda args: self.early_results.pop(id(op)) if id(op) in self.early_results else step(args)
        if isinstance(op, ExpertsOp):
            return self.expert_parallel_step(op)
        return step

    def expert_parallel_step(self, op: ExpertsOp):
        layer = self.placement.layers.index(op.block)
        owners = torch.tensor(self.placement.ranks[layer], dtype=torch.int64)
        local_index = local_positions(owners, self.world_size)
        schedule = self.schedules.get(op.block, LayerSchedule(1, False, 0.0, 0.0))
        weights = self.program.weights
        refs = {role: op.weight(role) for role in EXPERT_ROLES}
        weight = {role: None if ref is None else weights[ref.name] for role, ref in refs.items()}
        shared = self.shared_of.get(id(op)) if schedule.overlap else None
        shared_step = super().prepare(shared) if shared is not None else None
        spec = op.spec

        def step(args):
            x, indices, routing = args
            hidden, k = x.shape[-1], indices.shape[-1]
            # Dynamic skip's dropped pairs stay home, as the torch runner leaves them uncomputed.
            kept = ~skipped_pairs(routing.float(), op.skip_threshold).reshape(-1, k) if op.skip_threshold else None
            run_shared = (lambda: self.early_results.__setitem__(id(shared), shared_step([x]))) if shared else None
            y = expert_parallel_layer(x.reshape(-1, hidden), indices.reshape(-1, k), routing.reshape(-1, k), owners,
                                      local_index, weight, spec, schedule.chunks, run_shared, kept)
            return y.reshape(x.shape)

        return step

    def run_sharded(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run this rank's share (its rows of dim 0 of every input) and return the whole batch's outputs,
        gathered from every rank."""
        check_batch(inputs, self.program.graph, self.world_size)
        share = [x.tensor_split(self.world_size)[self.rank] if x.dim() else x for x in inputs]
        outputs = self.run(share)
        return [gather_rows(out, self.world_size) for out in outputs]


def check_batch(inputs: list[torch.Tensor], graph: Graph, world_size: int) -> None:
    """``BackendError`` unless ``graph``'s inputs can be shared along dim 0, the batch, by ``world_size`` ranks:
    an input the graph takes with dimensions is not 0-d, those with dimensions agree on their rows along
    dim 0, and the batch has at least one row per rank."""
    for name, value, x in zip(graph.input_names, graph.inputs, inputs, strict=True):
        if x.dim() == 0 and isinstance(value.type, TensorType) and value.type.rank:
            raise BackendError(f"input {name!r} is a 0-d tensor (a single value), and the plan takes {value.type} "
                               f"({value.type.rank} dims, the batch first); every rank takes its share of dim 0, "
                               f"so give {name} with its batch dimension")
    rows = {name: x.shape[0] for name, x in zip(graph.input_names, inputs, strict=True) if x.dim()}
    if len(set(rows.values())) > 1:
        given = ", ".join(f"{name} {count}" for name, count in rows.items())
        raise BackendError(f"the inputs differ in rows along dim 0 ({given}); every rank takes its share of dim 0 "
                           "of every input, so give them all the same batch size")
    batch = next(iter(rows.values()), 0)
    if batch < world_size:
        raise BackendError(f"a batch of {batch} cannot be shared by {world_size} ranks; give at least "
                           f"{world_size} rows")


def gather_rows(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (shares may differ in length by one row)."""
    length = torch.tensor([x.shape[0]])
    lengths = [torch.empty_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    longest = int(max(lengths))
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(n)] for part, n in zip(parts, lengths, strict=True)])


def local_positions(owners: torch.Tensor, world_size: int) -> torch.Tensor:
    """For each expert, its position among the experts its owner holds (the row of the local weights)."""
    local_index = torch.zeros_like(owners)
    for rank in range(world_size):
        mine = owners == rank
        local_index[mine] = torch.arange(int(mine.sum()))
    return local_index


@dataclass(frozen=True)
class ChunkRoute:
    """One chunk's (token, slot) pairs sorted by destination: by the rank owning their expert, then by the
    expert's row in that rank's weights. ``counts[r, j]``: how many pairs go to rank r's local expert j."""

    token_of_pair: torch.Tensor  # [P] the pair's token (row of this rank's tokens)
    weights: torch.Tensor  # [P] the pair's routing weight
    counts: torch.Tensor  # [R, L] with L the most experts any rank holds


def route_chunks(indices: torch.Tensor, routing: torch.Tensor, owners: torch.Tensor, local_index: torch.Tensor,
                 world_size: int, chunks: int, kept: torch.Tensor | None = None) -> list[ChunkRoute]:
    """Split this rank's tokens into ``chunks`` chunks and sort each chunk's pairs by destination; with
    ``kept`` [T, k], only the pairs it marks travel (dynamic skip's dropped pairs are neither sent nor run)."""
    k, per_rank = indices.shape[-1], int(local_index.max()) + 1
    destination = owners * per_rank + local_index  # per expert: its (rank, local row) as one sort key
    routes = []
    for chunk in torch.arange(indices.shape[0]).tensor_split(chunks):
        keys, token_of_pair = destination[indices[chunk].reshape(-1)], chunk.repeat_interleave(k)
        weights = routing[chunk].reshape(-1)
        if kept is not None:
            travels = kept[chunk].reshape(-1)
            keys, token_of_pair, weights = keys[travels], token_of_pair[travels], weights[travels]
        order = torch.argsort(keys, stable=True)
        counts = torch.bincount(keys, minlength=world_size * per_rank).reshape(world_size, per_rank)
        routes.append(ChunkRoute(token_of_pair[order], weights[order], counts))
    return routes


def received_expert_rows(counts: torch.Tensor) -> torch.Tensor:
    """[N] for received rows grouped by source rank, then by local expert (``counts`` [R, L] from each
    source rank), each row's local expert."""
    per_rank = counts.shape[1]
    return torch.arange(per_rank).repeat(counts.shape[0]).repeat_interleave(counts.reshape(-1))


def outgoing_rows(tokens: torch.Tensor, route: ChunkRoute, spec: ExpertsSpec) -> torch.Tensor:
    """[P, H] the token row of each of the chunk's pairs, in dispatch order, as the experts take it
    (``reference.weighted_rows``)."""
    return reference.weighted_rows(tokens[route.token_of_pair], route.weights, spec)


def add_combined(y: torch.Tensor, returned: torch.Tensor, route: ChunkRoute, spec: ExpertsSpec) -> None:
    """Sum each returned expert output (scaled in place, ``reference.weighted_outputs``) into its token's row
    of ``y``."""
    y.index_add_(0, route.token_of_pair, reference.weighted_outputs(returned, route.weights, spec))


def expert_parallel_layer(tokens: torch.Tensor, indices: torch.Tensor, routing: torch.Tensor, owners: torch.Tensor,
                          local_index: torch.Tensor, weight: dict[str, torch.Tensor | None], spec: Any, chunks: int,
                          run_shared: Any = None, kept: torch.Tensor | None = None) -> torch.Tensor:
    """One MoE layer across the process group, in the program order of ``moec.analysis.schedule``.

    ``tokens`` [T, H], ``indices``/``routing`` [T, k] are this rank's; ``owners[e]`` is expert e's rank,
    ``local_index[e]`` its row in its owner's ``weight`` tensors (which hold that rank's experts only).
    ``run_shared`` (or None) is called once the first dispatches are in flight; ``kept`` [T, k] (or None:
    all) marks the pairs to run. Returns y [T, H]. The layer runs in ``chunks`` chunks, or in as many as the
    most tokens any rank holds where that is fewer.

    Only token rows travel: the per-expert pair counts exchanged first tell each owner which of its
    experts every received row is for, since rows arrive sorted by expert.
    """
    w_in, w_out = weight["w_in"], weight["w_out"]
    if w_in is None or w_out is None:
        raise BackendError("an experts layer needs its w_in and w_out weights")
    world_size = dist.get_world_size()
    hidden = tokens.shape[-1]
    routes = route_chunks(indices, routing, owners, local_index, world_size, chunks, kept)
    send_counts = torch.stack([route.counts for route in routes], dim=1)  # [R, C, L]
    # Each rank's token count travels with its pair counts, so that every rank learns the most tokens any
    # rank holds and all agree, without another exchange, to leave out the chunks past it: with fewer
    # tokens than chunks (a small batch under a fixed ``chunks: N``) those are empty on every rank, and each
    # would still cost two all-to-alls. A rank with T < C tokens has one in each of its first T chunks, so
    # cutting the chunk list at the largest T leaves no token out.
    header = torch.cat([send_counts.reshape(world_size, -1), torch.full((world_size, 1), tokens.shape[0])], dim=1)
    received_header = torch.empty_like(header)
    dist.all_to_all_single(received_header, header)
    recv_counts = received_header[:, :-1].reshape(send_counts.shape)
    chunks = max(1, min(chunks, int(received_header[:, -1].max())))
    routes, send_counts, recv_counts = routes[:chunks], send_counts[:, :chunks], recv_counts[:, :chunks]
    sent = send_counts.sum(-1).T.tolist()  # [C][R] rows to each rank
    received = recv_counts.sum(-1).T.tolist()  # [C][R] rows from each rank

    def dispatch(i):
        rows = torch.empty(sum(received[i]), hidden, dtype=tokens.dtype)
        outgoing = outgoing_rows(tokens, routes[i], spec)
        return dist.all_to_all_single(rows, outgoing, received[i], sent[i], async_op=True), rows

    in_flight = {i: dispatch(i) for i in range(min(2, chunks))}
    if run_shared is not None:
        run_shared()
    combines = []
    for i in range(chunks):
        work, rows = in_flight.pop(i)
        work.wait()
        ids = received_expert_rows(recv_counts[:, i])
        out = experts_forward(rows, ids.unsqueeze(1), torch.ones(len(ids), 1), w_in, w_out,
                              weight["b_in"], weight["b_out"], dataclasses.replace(spec, weighted_input=False))
        returned = torch.empty(sum(sent[i]), hidden, dtype=out.dtype)
        combines.append((dist.all_to_all_single(returned, out, sent[i], received[i], async_op=True), returned))
        if i + 2 < chunks:
            in_flight[i + 2] = dispatch(i + 2)
    y = torch.zeros_like(tokens)
    for (work, returned), route in zip(combines, routes, strict=True):
        work.wait()
        add_combined(y, returned, route, spec)
    return y
