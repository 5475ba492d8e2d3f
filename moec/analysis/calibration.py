"""Calibration: run sample inputs once through the torch runner and keep what passes need.

API (stable; other passes build on it)::

    from moec.analysis.calibration import Calibration, calibrate

    cal = calibrate(program, samples, max_rows=2048)     # samples: list of kwargs dicts or arg tuples
                                                         # (or tensors, for a program with one input)
    stats = cal.dense["encoder.layer.0"]                 # DenseStats of an ffn.dense op, keyed by op.block
    stats.inputs    [N, H]  f32   subsampled FFN input rows (N <= max_rows, the same tokens in every block)
    stats.hidden    [N, F]  f32   the FFN's hidden activations on those rows (act(up), or act(gate) * up)
    stats.frequency [F]           fraction of all tokens on which each neuron is active
    stats.magnitude [F]           mean |hidden| of each neuron over all tokens
    moe = cal.moe["model.layers.3.mlp"]                  # MoEStats of a moe.experts op, keyed by op.block
    moe.indices [T, k] i64, moe.weights [T, k] f32       routing of *every* real token, in token order
    moe.inputs  [N, H]                                   subsampled router input rows
    moe.counts [E], moe.weight_mass [E], moe.coactivation [E, E]
    cal.affinity(block_a, block_b) [E_a, E_b]            P(expert j in b | expert i in a), token-aligned
    cal.traces(blocks) [T, len(blocks), k]               per-token expert choices across layers
    cal.row_tokens [N]                                   the token index (into the traces) of each kept row
    cal.save(folder) / Calibration.load(folder)          safetensors + JSON, never pickle

Tokens are the model's real tokens: positions where the sample's ``attention_mask`` (when the program
has an input of that name) is 0 are dropped, and a sample with no real token is left out with a warning
(an error when every sample is such). They are numbered sample by sample, row-major, identically in
every block that sees the same tokens, so statistics of different layers line up token by token. Blocks
that see other token counts (an encoder-decoder's decoder, the stages of a hierarchical vision model)
number and sample their own tokens; ``affinity`` and ``traces`` refuse MoE blocks whose tokens differ.
Rows are kept by bottom-k sampling on seeded random keys (a uniform sample without replacement, identical
in every block that sees the same tokens), so memory is bounded by ``max_rows`` per block however many
samples are given; routing traces are two small integers and floats per token and are kept whole.

A calibration remembers the flat input tensors it ran and the fingerprint of the program it ran on.
Passes do not call ``calibrate`` themselves: they ask ``PassContext.statistics(program)``, which reuses a
calibration whose fingerprint matches the current program and otherwise reruns the stored samples on it
(so statistics are recomputed exactly when a pass has rewritten the program since).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch.utils.weak import WeakIdKeyDictionary

from moec.analysis.real_tokens import real_token_rows, token_mask_of
from moec.analysis.traces import RoutingTrace
from moec.backend.torch_runner import TorchRunner, inplace_version
from moec.errors import MoecError, warn
from moec.ir.core import Operation
from moec.ir.ops import DenseFFNOp, ExpertsOp
from moec.ir.plan import stored_weight_names, unshared
from moec.ir.printer import print_graph
from moec.ir.program import Program
from moec.kernels.reference import activation, gated_activation
from moec.paths import user_path
from moec.progress import progress_bar

FORMAT_VERSION = 1
TENSORS_FILE = "calibration.safetensors"
META_FILE = "calibration.json"
DEFAULT_MAX_ROWS = 2048
SEED = 0


@dataclass
class DenseStats:
    """Statistics of one ``ffn.dense`` op. A neuron is *active* on a token when its |hidden| exceeds the
    mean |hidden| of that token's neurons (one rule for GELU and gated SiLU MLPs alike)."""

    inputs: torch.Tensor  # [N, H]
    hidden: torch.Tensor  # [N, F]
    active_count: torch.Tensor  # [F] f64, tokens on which the neuron was active
    abs_sum: torch.Tensor  # [F] f64, sum of |hidden| over all tokens
    tokens: int

    @property
    def frequency(self) -> torch.Tensor:
        return (self.active_count / max(self.tokens, 1)).float()

    @property
    def magnitude(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()


@dataclass
class MoEStats:
    """Statistics of one ``moe.experts`` op: the routing it was given for every token (by a ``moe.route``
    or the model's own router code) and subsampled input rows. Expert ids are the router's: after a merge
    that keeps every router row, ``num_experts`` is the op's ``routed_experts``, not its stored count (the
    compression passes that read these statistics rewrite router rows, and refuse merged layers)."""

    inputs: torch.Tensor  # [N, H]
    indices: torch.Tensor  # [T, k] i64
    weights: torch.Tensor  # [T, k] f32
    num_experts: int

    @property
    def counts(self) -> torch.Tensor:
        """[E] tokens routed to each expert."""
        return torch.bincount(self.indices.reshape(-1), minlength=self.num_experts)

    @property
    def frequency(self) -> torch.Tensor:
        """[E] fraction of tokens routed to each expert."""
        return self.counts.float() / max(self.indices.shape[0], 1)

    @property
    def weight_mass(self) -> torch.Tensor:
        """[E] sum of the routing weights each expert received."""
        mass = torch.zeros(self.num_experts, dtype=torch.float64)
        return mass.index_add_(0, self.indices.reshape(-1), self.weights.reshape(-1).double()).float()

    @property
    def coactivation(self) -> torch.Tensor:
        """[E, E] tokens routed to both i and j (the diagonal: tokens routed to i)."""
        one_hot = self.one_hot()
        return one_hot.T @ one_hot

    def one_hot(self) -> torch.Tensor:
        """[T, E] f32: 1 where a token is routed to an expert."""
        hot = torch.zeros(self.indices.shape[0], self.num_experts)
        return hot.scatter_(1, self.indices, 1.0)


@dataclass
class Calibration:
    """Statistics of one program on a set of samples (see the module docstring)."""

    fingerprint: str
    dense: dict[str, DenseStats] = field(default_factory=dict)
    moe: dict[str, MoEStats] = field(default_factory=dict)
    row_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    tokens: int = 0
    max_rows: int = DEFAULT_MAX_ROWS
    flat_samples: list[list[torch.Tensor]] = field(default_factory=list)
    input_names: list[str] | None = None  # what each entry of a flat sample is (None: not recorded, older files)

    def samples_for(self, program: Program) -> list[list[torch.Tensor]]:
        """The stored samples as ``program``'s flat inputs: entries matched by input name (a program captured
        from an example that gave its inputs in another order takes them in that order); ``MoecError`` when
        the names differ, since the samples are of another model's inputs."""
        names = list(program.graph.input_names)
        if self.input_names is None or self.input_names == names:
            return self.flat_samples
        if sorted(self.input_names) != sorted(names):
            raise MoecError(f"the calibration's samples give the inputs {self.input_names}, the program takes "
                            f"{names}; pass sample inputs for this model")
        order = [self.input_names.index(name) for name in names]
        return [[sample[i] for i in order] for sample in self.flat_samples]

    def describe(self) -> str:
        """One line for a plan's report: what the statistics cover and how to reuse them."""
        blocks = [f"{len(self.dense)} FFN{'s' if len(self.dense) != 1 else ''}" if self.dense else "",
                  f"{len(self.moe)} MoE block{'s' if len(self.moe) != 1 else ''}" if self.moe else ""]
        covered = " and ".join(b for b in blocks if b) or "no block"
        samples = len(self.flat_samples)
        return (f"{samples} sample{'s' if samples != 1 else ''}, {self.tokens:,} real tokens; statistics of "
                f"{covered}, at most {self.max_rows:,} rows each (`{META_FILE}`, `{TENSORS_FILE}`); reuse them with "
                "`moec.load(folder).calibration` or `moec compile --calibration folder`")

    def affinity(self, block_a: str, block_b: str) -> torch.Tensor:
        """[E_a, E_b]: of the tokens routed to expert i in ``block_a``, the fraction routed to j in ``block_b``
        (rows sum to ``top_k`` of block b where expert i got tokens)."""
        a, b = self.moe[block_a], self.moe[block_b]
        self.check_aligned([block_a, block_b])
        joint = a.one_hot().T @ b.one_hot()
        return joint / a.counts.clamp(min=1).unsqueeze(1).float()

    def traces(self, blocks: Sequence[str] | None = None) -> torch.Tensor:
        """[T, L, k] i64: each token's chosen experts in each MoE block (default: all, in program order)."""
        names = list(self.moe) if blocks is None else list(blocks)
        self.check_aligned(names)
        return torch.stack([self.moe[name].indices for name in names], dim=1)

    def check_aligned(self, blocks: Sequence[str]) -> None:
        counts = {block: self.moe[block].indices.shape[0] for block in blocks}
        if len(set(counts.values())) > 1:
            raise MoecError(f"calibration: MoE blocks {', '.join(f'{b} ({n} tokens)' for b, n in counts.items())} "
                            "saw different tokens (an encoder and a decoder?); their routing does not line up "
                            "token by token")

    def to_files(self) -> dict[str, str | bytes]:
        """The calibration as plan-folder files: a safetensors blob and a JSON description."""
        tensors: dict[str, torch.Tensor] = {"row_tokens": self.row_tokens}
        for block, stats in self.dense.items():
            for key in ("inputs", "hidden", "active_count", "abs_sum"):
                tensors[f"dense/{block}/{key}"] = getattr(stats, key)
        for block, moe_stats in self.moe.items():
            for key in ("inputs", "indices", "weights"):
                tensors[f"moe/{block}/{key}"] = getattr(moe_stats, key)
        for i, sample in enumerate(self.flat_samples):
            for j, tensor in enumerate(sample):
                tensors[f"samples/{i}/{j}"] = tensor
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "tokens": self.tokens,
            "max_rows": self.max_rows,
            "dense": {block: {"tokens": s.tokens} for block, s in self.dense.items()},
            "moe": {block: {"num_experts": s.num_experts} for block, s in self.moe.items()},
            "samples": [len(sample) for sample in self.flat_samples],
            "input_names": self.input_names,
        }
        blob = safetensors.torch.save(unshared(tensors))
        return {TENSORS_FILE: blob, META_FILE: json.dumps(meta, indent=1)}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``calibration.safetensors`` and ``calibration.json`` into ``folder`` (created if needed)."""
        folder = user_path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in self.to_files().items():
            staging = folder / f".{name}.tmp"
            staging.write_bytes(content if isinstance(content, bytes) else content.encode())
            staging.replace(folder / name)
        return folder

    @staticmethod
    def load(folder: str | os.PathLike) -> Calibration:
        """Read a calibration written by ``save`` (or stored in a plan folder)."""
        folder = user_path(folder)
        if not (folder / META_FILE).is_file() or not (folder / TENSORS_FILE).is_file():
            raise MoecError(f"{folder} holds no calibration ({META_FILE} and {TENSORS_FILE}); "
                            "compile with calibration samples to write one")
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            version = meta.get("format_version")
        except (ValueError, RecursionError, AttributeError) as err:
            raise MoecError(f"{folder / META_FILE} does not read as a calibration ({type(err).__name__}); "
                            "calibrate again") from None
        if version != FORMAT_VERSION:
            raise MoecError(f"{folder / META_FILE} has calibration format {version}, this moec reads "
                            f"{FORMAT_VERSION}; calibrate again")
        try:
            return Calibration.from_parts(meta, safetensors.torch.load_file(str(folder / TENSORS_FILE)))
        except Exception as err:  # a truncated tensor file, or entries the two files do not share
            raise MoecError(f"{folder}: its calibration files do not match ({type(err).__name__}: {err}); "
                            "calibrate again") from None

    @staticmethod
    def from_parts(meta: dict[str, Any], t: dict[str, torch.Tensor]) -> Calibration:
        """The calibration of ``calibration.json``'s contents and the tensors of ``calibration.safetensors``."""
        dense = {
            block: DenseStats(t[f"dense/{block}/inputs"], t[f"dense/{block}/hidden"], t[f"dense/{block}/active_count"],
                              t[f"dense/{block}/abs_sum"], info["tokens"])
            for block, info in meta["dense"].items()
        }
        moe = {
            block: MoEStats(t[f"moe/{block}/inputs"], t[f"moe/{block}/indices"], t[f"moe/{block}/weights"],
                            info["num_experts"])
            for block, info in meta["moe"].items()
        }
        samples = [[t[f"samples/{i}/{j}"] for j in range(n)] for i, n in enumerate(meta["samples"])]
        names = meta.get("input_names")
        return Calibration(meta["fingerprint"], dense, moe, t["row_tokens"], meta["tokens"], meta["max_rows"], samples,
                           list(names) if isinstance(names, list) else None)


def fingerprint(program: Program) -> str:
    """A digest of the program's IR text and the tensors its weights are stored in (shape, dtype and every
    byte; a quantized weight's packed storage), so any rewrite of ops or weights, a permutation of a
    weight's values included, gives another fingerprint."""
    digest = hashlib.sha256(print_graph(program.graph).encode())
    for name in sorted(stored_weight_names(program.graph)):
        digest.update(f"{name}:".encode() + tensor_digest(program.weights[name]))
    return digest.hexdigest()


_TENSOR_DIGESTS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (its in-place version, its digest)


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """sha256 of ``tensor``'s shape, dtype and every byte, kept for the tensor while torch counts no in-place
    change to it: every pass asks for the program's fingerprint, and hashing a large model's weights (from a GPU
    through the host) each time would cost more than the pass. An inference tensor keeps no count and is
    hashed each time."""
    version = inplace_version(tensor)
    kept = _TENSOR_DIGESTS.get(tensor) if version is not None else None
    if kept is not None and kept[0] == version:
        return kept[1]
    digest = hashlib.sha256(f"{tuple(tensor.shape)}:{tensor.dtype}:".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    if version is not None:
        _TENSOR_DIGESTS[tensor] = (version, digest.digest())
    return digest.digest()


NO_SAMPLES = "calibration needs at least one sample (a dict of keyword inputs or a tuple of inputs)"
ACCEPTED_FORMS = ("a list of sample inputs (each a kwargs dict, an args tuple, or a tensor for a model with one "
                  "input), one batch as a dict or a tensor, or a Calibration (moec.load(plan_folder).calibration)")


def given_calibration(data: Any) -> Any:
    """What ``calibration=`` was given, as passes read it: None, a ``Calibration`` or a ``RoutingTrace`` (for
    expert placement), or a list of samples. A dict or a tensor is one batch; any other iterable (a generator
    too) is read once, here, so that every pass that calibrates sees all of it; a path, or anything else that
    is not a collection of samples, is refused."""
    if data is None or isinstance(data, (Calibration, RoutingTrace)):
        return data
    if isinstance(data, (Mapping, torch.Tensor)):
        return [data]
    if isinstance(data, (str, bytes, os.PathLike)):
        raise MoecError(f"calibration={os.fsdecode(data)!r} is a path, not calibration data; give {ACCEPTED_FORMS}")
    if not isinstance(data, Iterable) or is_numpy(data):
        raise MoecError(f"calibration of type {type(data).__name__} is not calibration data; give {ACCEPTED_FORMS}")
    samples = list(data)
    if not samples:
        raise MoecError(NO_SAMPLES)
    for index, sample in enumerate(samples):
        if not isinstance(sample, (torch.Tensor, Mapping, tuple, list)):
            raise MoecError(f"calibration sample {index} is of type {type(sample).__name__}; give each sample as torch "
                            "tensors (tokenize text first): a dict of the model's inputs by name or a tuple")
        values = sample.items() if isinstance(sample, Mapping) else enumerate(sample)
        for key, value in values:
            if is_numpy(value) or holds_python_numbers(value):
                where = f"{key!r}" if isinstance(sample, Mapping) else f"argument {key}"
                raise MoecError(f"calibration sample {index}: {where} is a {type(value).__name__}; give torch tensors "
                                "(a tokenizer does with return_tensors='pt')")
    return samples


def holds_python_numbers(value: Any) -> bool:
    """Whether ``value`` is a (nested) list or tuple of Python numbers, as a tokenizer returns without tensors."""
    if not isinstance(value, (list, tuple)):
        return False
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return isinstance(value, (int, float))


def is_numpy(value: Any) -> bool:
    """Whether ``value`` is a numpy array or scalar (checked without importing numpy)."""
    return type(value).__module__ == "numpy"


def flatten_samples(program: Program, samples: Iterable[Any]) -> list[list[torch.Tensor]]:
    """Each sample (see ``flat_sample``) as the program's flat input tensors."""
    flat: list[list[torch.Tensor]] = []
    arity = len(program.graph.inputs)
    for sample in samples:
        if isinstance(sample, torch.Tensor) and arity != 1:
            raise MoecError(f"calibration sample {len(flat)} is one tensor, and the model takes {arity} inputs "
                            f"({', '.join(program.graph.input_names)}); give each sample as a dict of them "
                            "by name or a tuple")
        try:
            flat.append(flat_sample(program, sample, arity))
        except (TypeError, ValueError) as err:  # the program's own messages name the input at fault
            raise MoecError(f"calibration sample {len(flat)} does not fit the model's inputs: {err}") from None
    if not flat:
        raise MoecError(NO_SAMPLES)
    for index, sample in enumerate(flat):
        empty = program.empty_input(sample)
        if empty is not None:
            raise MoecError(f"calibration sample {index}: {empty}; give samples of at least one row and one token")
    return without_padding_only_samples(program, flat)


def flat_sample(program: Program, sample: Any, arity: int) -> list[torch.Tensor]:
    """One sample as the program's flat inputs, checked and cast like a call's: a kwargs dict, a tuple of the
    model's positional arguments, a list of the program's flat inputs (as ``Program.flatten_inputs`` gives
    them: graph input order, which can differ from the model's positional order), or the one input of a
    one-input program."""
    if isinstance(sample, torch.Tensor):
        leaves = [sample]
    elif isinstance(sample, list) and len(sample) == arity and all(isinstance(t, torch.Tensor) for t in sample):
        leaves = sample
    else:
        args, kwargs = ((), dict(sample)) if isinstance(sample, Mapping) else (tuple(sample), {})
        return program.flatten_inputs(args, kwargs)
    program.check_input_shapes(leaves)
    return program.with_captured_dtypes(leaves)


def without_padding_only_samples(program: Program, flat: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """``flat`` without the samples whose ``attention_mask`` is all zeros (no real token to learn from), left
    out with a warning; one error when that leaves none."""
    names = program.graph.input_names
    if "attention_mask" not in names:
        return flat
    mask_index = names.index("attention_mask")
    padding_only = {i for i, sample in enumerate(flat) if not sample[mask_index].any()}
    if len(padding_only) == len(flat):
        raise MoecError("calibration: the attention_mask of every sample is all zeros, so there is no real token "
                        "to calibrate on; give samples with real tokens (attention_mask 1 at each of them)")
    if padding_only:
        warn(f"calibration: samples {sorted(padding_only)} are left out, their attention_mask is all "
             "zeros (padding only)")
    return [sample for i, sample in enumerate(flat) if i not in padding_only]


class _Recorder:
    """The runner observer: accumulates per-block statistics of the sample being run."""

    def __init__(self, program: Program, max_rows: int) -> None:
        self.program = program
        self.max_rows = max_rows
        self.dense: dict[str, dict[str, Any]] = {}
        self.moe: dict[str, dict[str, Any]] = {}
        self.kept_keys = torch.zeros(0)
        self.kept_tokens = torch.zeros(0, dtype=torch.int64)
        self.tokens = 0
        self.generator = torch.Generator().manual_seed(SEED)

    def start_sample(self, token_mask: torch.Tensor | None) -> None:
        self.token_mask = token_mask
        self.sample_tokens: int | None = None
        self.sample_keys: dict[int, torch.Tensor] = {}  # token count -> the sample's row keys for it

    def real_rows(self, x: torch.Tensor) -> torch.Tensor:
        rows = real_token_rows(x, self.token_mask)
        if self.sample_tokens is None:
            self.sample_tokens = rows.shape[0]
        if rows.shape[0] not in self.sample_keys:
            self.sample_keys[rows.shape[0]] = torch.rand(rows.shape[0], generator=self.generator)
        return rows

    def keep_rows(self, state: dict[str, Any], names: tuple[str, ...], new: tuple[torch.Tensor, ...]) -> None:
        """Bottom-k sampling: keep the rows with the ``max_rows`` smallest keys seen so far."""
        count = new[0].shape[0]
        first = state.get("numbered", 0)  # this block's tokens so far
        state["numbered"] = first + count
        keys = torch.cat([state.get("keys", torch.zeros(0)), self.sample_keys[count]])
        order = torch.argsort(keys)[: self.max_rows]
        state["keys"] = keys[order]
        state["row_tokens"] = torch.cat([state.get("row_tokens", torch.zeros(0, dtype=torch.int64)),
                                     torch.arange(first, first + count)])[order]
        for name, rows in zip(names, new, strict=True):
            old = state.get(name)
            state[name] = (rows if old is None else torch.cat([old, rows]))[order].contiguous()

    def __call__(self, op: Operation, args: list[Any], result: Any) -> None:
        if isinstance(op, DenseFFNOp):
            self.observe_dense(op, args[0])
        elif isinstance(op, ExpertsOp):
            self.observe_routing(op, args[0], (args[1], args[2]))

    def weight(self, op: Operation, role: str) -> torch.Tensor | None:
        ref = op.kwargs.get(role)
        return None if ref is None else self.program.weights[ref.name].float()

    def required_weight(self, op: DenseFFNOp, role: str) -> torch.Tensor:
        return self.program.weights[op.required_weight(role).name].float()

    def observe_dense(self, op: DenseFFNOp, x: torch.Tensor) -> None:
        rows = self.real_rows(x).float()
        spec = op.spec
        up = torch.nn.functional.linear(rows, self.required_weight(op, "w_up"), self.weight(op, "b_up"))
        if spec.gated:
            w_gate, b_gate = self.required_weight(op, "w_gate"), self.weight(op, "b_gate")
            hidden = gated_activation(torch.nn.functional.linear(rows, w_gate, b_gate), up, spec)
        else:
            hidden = activation(spec.act)(up)
        magnitude = hidden.abs()
        state = self.dense.setdefault(op.block, {"active_count": 0, "abs_sum": 0, "tokens": 0})
        state["active_count"] = state["active_count"] + (magnitude > magnitude.mean(1, keepdim=True)).sum(0).double()
        state["abs_sum"] = state["abs_sum"] + magnitude.sum(0).double()
        state["tokens"] += rows.shape[0]
        self.keep_rows(state, ("inputs", "hidden"), (rows, hidden))

    def observe_routing(self, op: ExpertsOp, x: torch.Tensor, result: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The choice a ``moe.experts`` op is given (by a ``moe.route``, or the model's own router code)."""
        rows = self.real_rows(x).float()
        indices, weights = result
        flat_indices = real_token_rows(indices, self.token_mask)
        flat_weights = real_token_rows(weights, self.token_mask).float()
        state = self.moe.setdefault(op.block, {"indices": [], "weights": [], "num_experts": op.routed_experts})
        state["indices"].append(flat_indices.clone())
        state["weights"].append(flat_weights.clone())
        self.keep_rows(state, ("inputs",), (rows,))

    def end_sample(self) -> None:
        self.tokens += self.sample_tokens or 0

    def result(self, fingerprint_: str, flat_samples: list[list[torch.Tensor]]) -> Calibration:
        """The statistics, as ordinary tensors (the runner records them in inference mode, whose tensors
        a user's autograd code could not use)."""
        def ordinary(t: torch.Tensor) -> torch.Tensor:
            return t.clone() if t.is_inference() else t

        dense = {
            block: DenseStats(ordinary(s["inputs"]), ordinary(s["hidden"]), ordinary(s["active_count"]),
                              ordinary(s["abs_sum"]), s["tokens"])
            for block, s in self.dense.items()
        }
        moe = {
            block: MoEStats(ordinary(s["inputs"]), ordinary(torch.cat(s["indices"])),
                            ordinary(torch.cat(s["weights"])), s["num_experts"])
            for block, s in self.moe.items()
        }
        any_state = next(iter([*self.dense.values(), *self.moe.values()]), {})
        row_tokens = ordinary(any_state.get("row_tokens", torch.zeros(0, dtype=torch.int64)))
        return Calibration(fingerprint_, dense, moe, row_tokens, self.tokens, self.max_rows, flat_samples,
                           list(self.program.graph.input_names))


def calibrate(program: Program, samples: Iterable[Any], *, max_rows: int = DEFAULT_MAX_ROWS,
              progress: bool = True, label: str = "calibrating") -> Calibration:
    """Run ``samples`` (kwargs dicts or args tuples, as the model takes them) through ``program`` once and
    collect statistics of its ``ffn.dense`` and ``moe.experts`` ops (see the module docstring); ``progress``:
    a bar named ``label`` on a terminal, advancing per sample."""
    return calibrate_flat(program, flatten_samples(program, samples), max_rows=max_rows, progress=progress,
                          label=label)


def calibrate_flat(program: Program, flat_samples: list[list[torch.Tensor]], *, max_rows: int = DEFAULT_MAX_ROWS,
                   progress: bool = True, label: str = "calibrating") -> Calibration:
    """``calibrate`` on samples already flattened to the program's input tensors."""
    if max_rows < 1:
        raise MoecError(f"max_rows={max_rows} must be at least 1")
    names = program.graph.input_names
    runner = TorchRunner(program)
    recorder = _Recorder(program, max_rows)
    for index, inputs in enumerate(progress_bar(flat_samples, label, progress)):
        if len(inputs) != len(names):
            raise MoecError(f"a calibration sample has {len(inputs)} inputs, the program takes {len(names)}")
        recorder.start_sample(token_mask_of(program, inputs))
        run_sample(runner, inputs, index, recorder)
        recorder.end_sample()
    return recorder.result(fingerprint(program), flat_samples)


def run_sample(runner: TorchRunner, inputs: list[torch.Tensor], index: int,
               observe: Callable[[Operation, list[Any], Any], None]) -> None:
    """Run calibration sample ``index`` (flat inputs) through ``runner`` with ``observe``; a sample the model
    cannot run is a ``MoecError`` naming it and what to check."""
    try:
        runner.run(inputs, observe=observe)
    except (IndexError, RuntimeError, ValueError) as error:
        program = runner.program
        found = program.input_problem(inputs)
        if found is not None:
            problem, advice = found
            raise MoecError(f"calibration sample {index}: {problem}, and the model fails on it "
                            f"({type(error).__name__}: {error}); give samples with {advice}") from error
        shapes = ", ".join(f"{name} {tuple(x.shape)}" for name, x in zip(program.graph.input_names, inputs,
                                                                          strict=True))
        raise MoecError(f"calibration sample {index} ({shapes}) does not run through the model: "
                        f"{type(error).__name__}: {error}; check that the samples are valid inputs for it "
                        "(token ids below the vocabulary size, sequences within the model's position table, "
                        "shapes the model takes)") from error
