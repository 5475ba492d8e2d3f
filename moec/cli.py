"""The ``moec`` command: compile a model into a plan folder, and inspect plans.

Exit codes: 0 success, 1 a moec error (the message says what to do), 2 bad usage (an argument that cannot
be used as given, such as a ``--calibration`` path that is not a calibration file).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import rich
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from moec import __version__
from moec.errors import MoecError, PlanError
from moec.paths import user_path
from moec.report import (
    REPORT_FILE,
    check_lines,
    expert_parallel_lines,
    onnx_fallback_lines,
    pass_details,
    quality_lines,
    size_change,
    triton_lines,
)


def piped_width(stream: object) -> int | None:
    """The width to print at: a terminal's own (None: rich asks it); piped, ``COLUMNS`` where it is set to a
    number, else 140 (rich would fall back to 80 columns and cut the tables narrow)."""
    if getattr(stream, "isatty", lambda: False)():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else 140


WIDTH = piped_width(sys.stdout)
# What a command finds (tables, checks) goes to stdout; how it gets there (each step's spinner and time, the
# progress of calibration and passes) to stderr, on rich's global console, where the progress moec's library
# code shows draws below this command's spinner rather than over it. `moec compile > out.txt` keeps showing
# its progress, and out.txt holds results only.
console = Console(highlight=False, width=WIDTH, soft_wrap=True)  # a message is one line, for grep
rich.reconfigure(stderr=True, highlight=False, width=piped_width(sys.stderr), soft_wrap=True)
status = rich.get_console()


def keep_going_without_stdout() -> None:
    """What rich does when stdout's reader has gone (``moec compile -o plan | head``): stop printing and go on,
    so that the plan is still written (rich's own default exits with code 1, without a word)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    console.quiet = True


console.on_broken_pipe = keep_going_without_stdout  # type: ignore[method-assign]
errors = Console(stderr=True, highlight=False, width=piped_width(sys.stderr), soft_wrap=True)

CALIBRATION_FORMS = ("a .txt file (one text sample per line), a .safetensors file (the model's inputs by name, "
                     "samples along dim 0), or a plan folder holding a calibration, to reuse its samples")


class UsageError(MoecError):
    """A command-line argument that cannot be used as given: exit code 2, like argparse's own usage errors."""


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """Show a spinner while a long step runs, then its time (on stderr)."""
    start = time.perf_counter()
    with status.status(f"{title}..."):
        yield
    status.print(f"[green]done[/] {title} ({time.perf_counter() - start:.1f} s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moec",
        description="moec: an MoE-aware model compiler. Capture a PyTorch model, run passes, write a plan.",
    )
    parser.add_argument("--version", action="version", version=f"moec {__version__} (torch {torch.__version__})",
                        help="show moec's version and the torch it runs on, and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compile_ = commands.add_parser(
        "compile", help="compile a model into a plan folder and check parity with the original",
        description="Compile a model and check its outputs against the original model on the example "
                    "inputs and on inputs of another batch/sequence size.",
    )
    compile_.add_argument(
        "--model", default="minilm", metavar="MODEL",
        help="what to compile: a preset (minilm [default: the real all-MiniLM-L6-v2, offline], tiny-mixtral, "
             "tiny-qwen2-moe, tiny-qwen3-moe, tiny-olmoe, tiny-deepseek-v3, tiny-phimoe, tiny-gpt-oss, "
             "tiny-llama, tiny-gpt2, tiny-bert), a local Hugging Face model folder, or pkg.module:factory (a function returning a model or "
             "(model, example_kwargs))",
    )
    compile_.add_argument("-o", "--output", metavar="PLAN", help="write the plan folder here (replaced if it is a plan); without it, "
                          "nothing is written")
    compile_.add_argument("--recipe", metavar="FILE", help="YAML/JSON recipe listing the passes to run")
    compile_.add_argument(
        "--calibration", metavar="FILE",
        help="data for passes that calibrate: a .txt file (one text sample per line, encoded by the model's "
             "tokenizer), a .safetensors file (the model's inputs by name, samples along dim 0), or a plan folder "
             "written after a pass that calibrated (its stored samples, and its statistics where the model is the "
             "same); default: built-in English text (standard-library docstrings) when the model has a tokenizer",
    )
    compile_.add_argument("--backend", default="torch", choices=["torch", "triton"],
                          help="execution backend (default: torch); triton writes its generated kernels into the plan")
    compile_.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="cast the model and its floating-point example inputs to this dtype first (default: float32, "
             "the model as it loads)"
    )
    compile_.add_argument("--print-ir", action="store_true", help="print the compiled IR")

    inspect_ = commands.add_parser(
        "inspect", help="show a plan's IR and a table of its layers, experts, parameters and bytes",
        description="Load a plan folder (checking its format version and checksums) and describe it.",
    )
    inspect_.add_argument("plan", metavar="PLAN", help="a plan folder written by `moec compile -o`")
    inspect_.add_argument("--no-ir", action="store_true", help="show only the table, not the IR text")
    inspect_.add_argument(
        "--json", action="store_true",
        help="print one JSON object instead, for scripts: the plan's versions, model class and backend, its layers "
             "(the table's rows), its weights' parameters and bytes, the passes that ran with what each changed, "
             "and the report recorded when it was compiled (checks, quality, kernels, placement); no IR unless "
             "it is asked for with --ir",
    )
    inspect_.add_argument("--ir", action="store_true", help="with --json: include the IR text")

    export_ = commands.add_parser(
        "export-onnx", help="export a plan to a .onnx file checked in onnxruntime",
        description="Export a plan folder to ONNX (dynamic batch and sequence axes), then check it with "
                    "onnx.checker, shape inference and an onnxruntime parity run against the torch runner.",
    )
    export_.add_argument("plan", metavar="PLAN", help="a plan folder written by `moec compile -o`")
    export_.add_argument("-o", "--output", required=True, metavar="FILE", help="the .onnx file to write")
    export_.add_argument(
        "--lowering", default="portable", choices=["portable", "ort"],
        help="MoE ops as standard ONNX ops (portable, default) or onnxruntime's com.microsoft.MoE (ort)",
    )
    export_.add_argument("--opset", type=int, default=None,
                         help="ONNX opset: 18 (torch.onnx's) up to what the installed onnx converts to "
                              "(default: 20)")
    export_.add_argument(
        "--external-data", action=argparse.BooleanOptionalAction, default=None,
        help="store weights in FILE.data beside the model (default: when weights exceed 1 GiB; "
             "--no-external-data is refused above 1.5 GiB, which torch.onnx writes only as external data)",
    )
    return parser


# How much shorter than the example's the resized inputs' last dynamic dimension is tried, in turn, until the
# capture's conditions on input sizes hold (a size the model's code takes another branch for is not parity).
SHORTER_BY = (2, 4, 1, 3)


def resized(example: dict[str, Any], program: Any) -> dict[str, Any] | None:
    """The example at a shape capture never saw, within the capture's conditions on input sizes
    (``moec.ir.guards``), or None when no size tried (``SHORTER_BY``) meets them."""
    for shorter in SHORTER_BY:
        inputs = resized_by(example, program, shorter)
        try:
            program.flatten_inputs((), inputs)
        except ValueError:
            continue
        return inputs
    return None


def resized_by(example: dict[str, Any], program: Any, shorter: int) -> dict[str, Any]:
    """The example with one more batch row, and its last dynamic dimension (sequence) ``shorter`` shorter
    (at least 1), changed only where the compiled graph's input type is dynamic and alike in inputs that share
    the dimension; rows are repeated or cut, never made up, so float and integer inputs alike keep valid values."""
    types = dict(zip(program.graph.input_names, program.graph.inputs, strict=True))

    def graph_shape(key: str, value: Any) -> tuple:
        """The compiled graph's shape of input ``key`` (symbols for dynamic dims), () if it has none."""
        return tuple(types[key].tensor_type.shape) if key in types and isinstance(value, torch.Tensor) else ()

    sizes: dict[str, int] = {}  # a dynamic dim's new size, by its symbol
    for key, value in example.items():
        shape = graph_shape(key, value)
        dynamic = [axis for axis, dim in enumerate(shape) if isinstance(dim, str)]
        if len(shape) < 2 or not dynamic:
            continue
        if dynamic[0] == 0:
            sizes.setdefault(shape[0], value.shape[0] + 1)
        if dynamic[-1] != 0:
            sizes.setdefault(shape[dynamic[-1]], max(1, value.shape[dynamic[-1]] - shorter))
    out = {}
    for key, value in example.items():
        for axis, dim in enumerate(graph_shape(key, value)):
            if dim in sizes:
                rows = torch.arange(sizes[dim], device=value.device) % value.shape[axis]
                value = value.index_select(axis, rows)
        out[key] = value
    return out


def in_dtype(example: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The example with its floating-point tensors in ``dtype`` (ids and masks stay as they are)."""
    return {key: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for key, value in example.items()}


def summary_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("#", "op", "weights", "experts", "top-k", "detail", "params", "bytes"):
        number = column in ("#", "experts", "top-k", "params", "bytes")
        # a narrow terminal wraps the names (never cut to "model.lay…": users copy them into recipes), not numbers
        table.add_column(column, justify="right" if number else "left", no_wrap=number, overflow="fold")
    for index, row in enumerate(rows):
        table.add_row(str(index), row["op"], row["weights"], str(row["experts"]), str(row["top_k"]),
                      row["detail"], f"{row['params']:,}", f"{row['bytes']:,}")
    total_params = sum(r["params"] for r in rows)
    total_bytes = sum(r["bytes"] for r in rows)
    table.add_row("", "total", "", "", "", "", f"{total_params:,}", f"{total_bytes:,}")
    return table


def run_compile(args: argparse.Namespace) -> int:
    import moec
    from moec.api import changes_outputs
    from moec.frontend.zoo import load_model_spec
    from moec.ir.ops import ExpertsOp
    from moec.ir.plan import check_plan_target
    from moec.passes import build_passes, load_recipe
    from moec.passes.dynamic_skip import skip_statistics

    if args.output:
        try:  # before the work, not after it
            check_plan_target(args.output)
        except PlanError as err:
            raise UsageError(str(err)) from None
    if args.calibration:
        check_calibration_path(args.calibration)
    if args.recipe:
        check_recipe_path(args.recipe)
    if args.backend == "triton":
        from moec.backend.triton_runner import check_available

        check_available()
    recipe = load_recipe(args.recipe)  # read once: the passes decide calibration and how outputs are checked
    passes = build_passes(recipe)
    if args.calibration and not any(p.uses_calibration() for p in passes):  # before the model loads, not after
        from moec.passes.base import unused_calibration

        raise UsageError(f"--calibration {args.calibration}: {unused_calibration(passes)}; leave it out")
    check_calibration_source(args.model, passes, args.calibration)  # before the model loads, not after
    with step(f"loading model {args.model}"):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # this step's spinner is the progress: two would garble
        model, example = load_model_spec(args.model)
        dtype = getattr(torch, args.dtype)
        model, example = model.to(dtype), in_dtype(example, dtype)
    calibration, held_out = calibration_data(args.model, passes, args.calibration)
    if isinstance(calibration, list):
        calibration = [in_dtype(batch, dtype) for batch in calibration]  # float inputs follow --dtype as the model's
    with step("capturing and compiling"):
        compiled = moec.compile(model, example, recipe=recipe, calibration=calibration, backend=args.backend)
    console.print(summary_table(compiled.summary(), f"{type(model).__name__}: FFN and MoE layers"), soft_wrap=False)
    for line in triton_lines(compiled.program.metadata):
        console.print(line, markup=False)
    for record in compiled.program.metadata.get("passes", []):
        change = size_change(record)
        console.print(f"pass {record['pass']}: {record['seconds']:.2f} s; experts {change['experts']}, parameters "
                      f"{change['params']}, bytes {change['bytes']}")
        for line in pass_details(record.get("summary", {})):
            console.print(f"  {line}", markup=False)
    skipping = [op for op in compiled.program.graph.ops_of(ExpertsOp) if op.skip_threshold]
    if skipping:  # how much dynamic-skip saves depends on the inputs: measure it on the example
        skipped = skip_statistics(compiled.program, [compiled.program.flatten_inputs((), example)])
        console.print(f"dynamic skipping: {skipped['skipped']:,} of {skipped['evaluations']:,} expert evaluations "
                      f"({skipped['skipped_fraction']:.1%}) skipped on the example inputs")
    if args.print_ir:
        console.print(compiled.ir, markup=False)
    if held_out is not None:
        show_quality(model, compiled, held_out)
        show_timed_kernels(compiled.backend)
        return write_plan(compiled, args.output)
    changing = changes_outputs(compiled.program)  # passes that change the outputs by design: no parity to hold
    checks = {"example inputs": example}
    other_size = resized(example, compiled.program)
    if other_size is None:
        console.print("(no parity check at another size: none tried meets the conditions the model's code holds "
                      "on its input sizes, kept in plan.json as input_guards)")
    else:
        checks["resized inputs"] = other_size
    with step("comparing with the original model" if changing else "checking parity with the original model"):
        records = [compiled.check(model, inputs, label) for label, inputs in checks.items()]
    for line in check_lines(records):
        text = Text(line)
        text.highlight_regex(r"(?<= )ok(?= \(tolerance)", "green")
        text.highlight_regex(r"(?<= )FAILED(?= \(tolerance)", "red")
        console.print(text)
    ok = all(record.get("passed", True) for record in records)
    if changing:
        verb = "changes" if len(changing) == 1 else "change"
        console.print(f"(not a parity check: {', '.join(changing)} {verb} the model's outputs by design)")
    show_timed_kernels(compiled.backend)
    if not ok:
        failed = " and ".join(record["inputs"] for record in records if not record.get("passed", True))
        written = f"; no plan was written to {args.output}" if args.output else ""
        errors.print(Text("error: ", style="bold red") + Text(f"the compiled model fails the parity check on the "
                                                              f"{failed} (above){written}"))
        return 1
    return write_plan(compiled, args.output)


def show_timed_kernels(backend: str) -> None:
    """The kernels the torch runner timed and chose while this command ran (routed experts, quantized linears),
    if any, for a plan that runs on the torch runner (the triton backend runs its own)."""
    from moec.backend.torch_runner import kernel_choice_lines

    lines = kernel_choice_lines() if backend == "torch" else []
    if lines:
        console.print("kernels timed on this host for routed experts and quantized linears (each one's best time in "
                      "the race):")
        for line in lines:
            console.print(f"  {line}", markup=False)


def write_plan(compiled: Any, output: str | None) -> int:
    if output:
        with step(f"writing plan to {output}"):
            folder = compiled.save(output)
        console.print(f"report: {folder / REPORT_FILE}", markup=False)
    return 0


CALIBRATION_SENTENCES, HELD_OUT_SENTENCES = 256, 128
CALIBRATION_BATCH = 32


def calibration_data(model_spec: str, passes: list[Any], path: str | None) -> tuple[Any, list | None]:
    """(calibration batches, held-out batches) when one of ``passes`` needs calibration, else Nones.

    Calibration is the ``path`` file when given (see ``read_calibration_file``; also when the passes only use
    it optionally, as dynamic-skip does to measure its skip rate), else built-in text:
    standard-library docstrings (``moec.analysis.corpus``) tokenized by the model's tokenizer. Held-out
    batches, for the quality table, are built-in text the calibration never saw (None without a tokenizer, or
    when no pass that calibrates changes the outputs by design: those recipes are held to parity).
    """
    needs = any(p.needs_calibration() for p in passes)
    if not needs and path is None:  # passes that only measure on calibration data get it when it is given
        return None, None
    from moec.analysis.corpus import calibration_and_held_out, tokenized_batches

    tokenizer = model_tokenizer(model_spec)
    with step(f"loading calibration data ({path or 'standard-library docstrings'})"):
        if tokenizer is None:
            assert path is not None, "check_calibration_source: without a tokenizer a calibration file is given"
            return read_calibration_file(path, tokenizer), None
        text, held_out = calibration_and_held_out(CALIBRATION_SENTENCES, HELD_OUT_SENTENCES)
        calibration = (read_calibration_file(path, tokenizer) if path is not None
                       else tokenized_batches(tokenizer, text, CALIBRATION_BATCH))
        changing = any(p.approximate and p.needs_calibration() for p in passes)
        return calibration, tokenized_batches(tokenizer, held_out) if changing else None


def tokenizer_folder(model_spec: str) -> Path | None:
    """The folder of the default model's or a local Hugging Face folder's tokenizer, or None (presets and
    factories have none); found without loading anything."""
    from moec.frontend.zoo import minilm_path

    folder = minilm_path() if model_spec == "minilm" else user_path(model_spec)
    return folder if (folder / "tokenizer_config.json").is_file() else None


def check_calibration_source(model_spec: str, passes: list[Any], path: str | None) -> None:
    """One ``MoecError`` when the recipe's calibration would need a tokenizer the model does not have: the
    built-in text (no ``--calibration``) or a ``.txt`` file."""
    needs = any(p.needs_calibration() for p in passes)
    if tokenizer_folder(model_spec) is not None:
        return
    if needs and path is None:
        raise MoecError(f"the recipe needs calibration data, and model {model_spec!r} has no tokenizer to encode the "
                        "built-in text; give --calibration FILE (token ids by input name in a .safetensors file)")
    if path is not None and user_path(path).suffix == ".txt":
        raise MoecError(f"--calibration {path}: the model has no tokenizer to encode text; give its inputs as "
                        "token ids in a .safetensors file instead")


def model_tokenizer(model_spec: str) -> Any:
    """The tokenizer of the default model or of a local Hugging Face folder, or None."""
    folder = tokenizer_folder(model_spec)
    if folder is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def check_calibration_path(path: str) -> Path:
    """``path`` if it names a calibration file of an accepted form, or the plan folder of a plan's calibration
    (given as the folder or one of its two calibration files), else one ``UsageError`` listing them."""
    from moec.analysis.calibration import META_FILE, TENSORS_FILE

    file = user_path(path)
    if file.name in (META_FILE, TENSORS_FILE) and (file.parent / META_FILE).is_file():
        return file.parent
    if file.is_dir():
        if (file / META_FILE).is_file():
            return file
        raise UsageError(f"--calibration {path} is a folder without a plan's {META_FILE}; give {CALIBRATION_FORMS}")
    if not file.is_file():
        raise UsageError(f"--calibration {path}: no such file")
    if file.suffix not in (".txt", ".safetensors"):
        raise UsageError(f"--calibration {path}: give {CALIBRATION_FORMS}")
    if file.suffix == ".txt":
        try:
            file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"--calibration {path} is not UTF-8 text (byte {err.start}); save it as UTF-8, "
                             "one sample per line") from None
    else:  # its header and size, read before the model loads (the tensors are read later)
        import safetensors

        try:
            with safetensors.safe_open(str(file), framework="pt"):
                pass
        except safetensors.SafetensorError as err:
            raise UsageError(f"--calibration {path} is not a readable .safetensors file (truncated or corrupt: "
                             f"{err}); write it again with safetensors.torch.save_file") from None
    return file


def check_recipe_path(path: str) -> None:
    """One ``UsageError`` when ``--recipe`` names no file (its contents are checked when it is read)."""
    file = user_path(path)
    if file.is_dir():
        raise UsageError(f"--recipe {path} is a folder; give a YAML or JSON recipe file, e.g. one holding "
                         "'passes: [{quantize: {bits: 4}}]'")
    if not file.is_file():
        raise UsageError(f"--recipe {path}: no such file")


def check_plan_path(path: str) -> Path:
    """The folder ``path`` names if it holds a ``plan.json`` (whose contents are checked when it is read), else
    one ``UsageError`` saying what to pass."""
    from moec.ir.plan import PLAN_FILE

    folder = user_path(path)
    if not folder.is_dir():
        problem = "is a file, not a plan folder" if folder.exists() else "does not exist"
        raise UsageError(f"PLAN {path} {problem}; pass a plan folder written by `moec compile -o`")
    if not (folder / PLAN_FILE).is_file():
        raise UsageError(f"PLAN {path} is not a moec plan: it has no {PLAN_FILE}; pass a plan folder written by "
                         "`moec compile -o`")
    return folder


def read_calibration_file(path: str, tokenizer: Any) -> Any:
    """Calibration batches from ``path``: a ``.txt`` file (one text sample per non-empty line, encoded by the
    model's tokenizer) or a ``.safetensors`` file (the model's inputs by name, samples along dim 0); or the
    ``Calibration`` a plan folder stores."""
    import safetensors
    import safetensors.torch

    from moec.analysis.calibration import Calibration
    from moec.analysis.corpus import tokenized_batches

    file = check_calibration_path(path)
    if file.is_dir():
        return Calibration.load(file)
    if file.suffix == ".txt":
        text = file.read_text(encoding="utf-8")  # check_calibration_path read it as UTF-8
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise MoecError(f"--calibration {path}: the file has no text (one sample per line)")
        if tokenizer is None:
            raise MoecError(f"--calibration {path}: the model has no tokenizer to encode text; give its inputs as "
                            "token ids in a .safetensors file instead")
        return tokenized_batches(tokenizer, lines, CALIBRATION_BATCH)
    try:
        tensors = safetensors.torch.load_file(str(file))
    except safetensors.SafetensorError as err:
        raise UsageError(f"--calibration {path} is not a readable .safetensors file (truncated or corrupt: {err}); "
                         "write it again with safetensors.torch.save_file") from None
    rows = {name: tensor.shape[0] if tensor.dim() else 0 for name, tensor in tensors.items()}
    if tensors and set(rows.values()) == {0}:
        raise MoecError(f"--calibration {path} holds no samples (its tensors {', '.join(sorted(rows))} have 0 rows along "
                        "dim 0); write the samples along dim 0")
    if not tensors or len(set(rows.values())) != 1 or 0 in rows.values():
        raise MoecError(f"--calibration {path}: expected the model's inputs by name with the same number of "
                        f"samples along dim 0, got {rows or 'no tensors'}")
    count = next(iter(rows.values()))
    return [{name: tensor[i:i + CALIBRATION_BATCH] for name, tensor in tensors.items()}
            for i in range(0, count, CALIBRATION_BATCH)]


def show_quality(model: Any, compiled: Any, held_out: list) -> None:
    """The converted model's sentence-embedding agreement with the original on held-out text."""
    from moec.analysis.quality import conversion_quality
    from moec.ir.ops import RouteOp

    sentences = sum(len(b["input_ids"]) for b in held_out)
    with step(f"measuring quality on {sentences} held-out sentences"):
        quality = conversion_quality(lambda batch: model(**batch)[0], compiled.program, held_out)
    compiled.report["quality"] = quality | {"sentences": sentences}
    routed = bool(compiled.program.graph.ops_of(RouteOp))
    title = "quality vs the original model"
    table = Table(title=f"{title} (active FFN fraction {quality['active_ffn_fraction']:.3f})" if routed else title)
    for column in ("routing" if routed else "model", "embedding cosine", "nearest-neighbour agreement"):
        table.add_column(column, justify="right" if table.columns else "left", overflow="fold")
    for label in ("router", "random", "oracle"):
        if label in quality:
            name = label if routed else "compiled"
            table.add_row(name, f"{quality[label]['cosine']:.4f}", f"{quality[label]['nn_agreement']:.1%}")
    console.print(table, soft_wrap=False)  # a table lays itself out
    if "gap_closed" in quality:
        console.print(f"the router closes {quality['gap_closed']:.0%} of the random-to-oracle cosine gap")


def run_inspect(args: argparse.Namespace) -> int:
    import moec
    from moec.ir.plan import read_plan_json

    folder, plan = read_plan_json(check_plan_path(args.plan), check_files=False)  # moec.load checks them
    # inspecting runs nothing: a triton plan needs no Triton here, a plan's fixed kernels need not run here
    compiled = moec.load(folder, backend="torch", expert_kernel="auto", quant_kernel="auto")
    if args.json:
        console.print_json(data=plan_description(folder, plan, compiled, with_ir=args.ir))
        return 0
    if args.ir:
        raise UsageError("--ir goes with --json (without --json the IR is shown unless --no-ir)")
    console.print(f"plan {folder}: format {plan['format_version']}, moec {plan.get('moec_version', '?')}, "
                  f"torch {plan.get('torch_version', '?')}, model {plan['metadata'].get('model_class', '?')}, "
                  f"backend {plan['metadata'].get('backend', 'torch')}")
    fixed = plan["metadata"].get("kernels")
    if fixed:
        console.print(f"kernels fixed at compile time: {', '.join(f'{name}={kernel}' for name, kernel in fixed.items())}",
                      markup=False)
    for line in recorded(lambda: triton_lines(plan["metadata"])):
        console.print(line, markup=False)
    if not args.no_ir:
        console.print(compiled.ir, markup=False)
    console.print(summary_table(compiled.summary(), "FFN and MoE layers"), soft_wrap=False)
    params, size = compiled.program.weight_sizes()
    console.print(f"all weights: {params:,} parameters, {size:,} bytes")
    for line in recorded(lambda: expert_parallel_lines(compiled.program)):
        console.print(line, markup=False)
    report = plan["metadata"].get("report", {})
    checked = recorded(lambda: check_lines(report.get("checks", [])) + quality_lines(report.get("quality")))
    if checked:
        console.print("checked against the original model when compiled:")
        for line in checked:
            console.print(f"  {line}", markup=False)
    if (folder / REPORT_FILE).is_file():
        console.print(f"report: {folder / REPORT_FILE}")
    return 0


def plan_description(folder: Path, plan: dict[str, Any], compiled: Any, with_ir: bool) -> dict[str, Any]:
    """What ``moec inspect --json`` prints: the plan as data (the metadata's records as plan.json holds them)."""
    params, size = compiled.program.weight_sizes()
    metadata = plan["metadata"]
    description = {
        "plan": str(folder),
        "format_version": plan["format_version"],
        "moec_version": plan.get("moec_version"),
        "torch_version": plan.get("torch_version"),
        "model_class": metadata.get("model_class"),
        "backend": metadata.get("backend", "torch"),
        "kernels": metadata.get("kernels"),
        "layers": compiled.summary(),
        "weights": {"params": params, "bytes": size},
        "passes": metadata.get("passes", []),
        "report": metadata.get("report", {}),
        "expert_parallel": metadata.get("expert_parallel"),
    }
    return description | ({"ir": compiled.ir} if with_ir else {})


def recorded(lines: Callable[[], list[str]]) -> list[str]:
    """The ``lines`` a plan's recorded report gives, or one line saying it does not read: plan.json is data a
    person may have edited, and inspecting it should still show the rest."""
    try:
        return lines()
    except (TypeError, KeyError, AttributeError, ValueError) as err:
        return [f"(a record in plan.json's metadata does not read: {type(err).__name__}: {err})"]


def run_export_onnx(args: argparse.Namespace) -> int:
    import moec
    from moec.backend.onnx.export import DEFAULT_OPSET, check_opset, check_target
    from moec.errors import BackendError

    opset = DEFAULT_OPSET if args.opset is None else args.opset
    try:  # before the work, not after it
        check_opset(opset)
        check_target(args.output)
    except BackendError as err:
        raise UsageError(str(err)) from None
    plan = check_plan_path(args.plan)
    # the export runs none of the plan's backend or kernels (Triton may be missing, a fixed kernel may not run)
    compiled = moec.load(plan, backend="torch", expert_kernel="auto", quant_kernel="auto")
    with step(f"exporting {args.plan} to {args.output} ({args.lowering} lowering) and checking it"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks are printed below, from the report
        compiled.export_onnx(args.output, lowering=args.lowering, opset=opset, external_data=args.external_data)
    report = compiled.report["onnx"]
    for line in onnx_fallback_lines(report):
        print_warning(line)
    fused = " and ".join(f"{count} {op} op{'s' if count > 1 else ''}"
                         for op, count in report["fused_moe_ops_by_op"].items()) or "no fused MoE ops"
    console.print(f"wrote {report['path']}: opset {report['opset']}, {fused}, "
                  f"external data {'yes' if report['external_data'] else 'no'}")
    diffs = ", ".join(f"{shape}: {diff:.3g}" for shape, diff in report["parity_max_abs_diff"].items())
    console.print(f"onnx.checker [green]ok[/], shape inference [green]ok[/], onnxruntime parity vs the torch "
                  f"runner (batch x sequence: max abs diff) {diffs} [green]ok[/] (tolerance {report['tolerance']:g})")
    return 0


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    """A warning as one ``warning: ...`` line: the file and line it was raised from mean nothing at a prompt."""
    print_warning(str(message))


def print_warning(message: str) -> None:
    """``warning: message`` on stderr, as one line however long."""
    errors.print(Text("warning: ", style="bold yellow") + Text(message))


def main(argv: list[str] | None = None) -> int:
    from moec.frontend.zoo import ModelSpecError

    args = build_parser().parse_args(argv)
    handlers = {"compile": run_compile, "inspect": run_inspect, "export-onnx": run_export_onnx}
    # so that a kill, as Ctrl-C, cleans up what it wrote (only the main thread may set a signal handler)
    handle_term = threading.current_thread() is threading.main_thread() \
        and signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, None)  # ignored, or set outside Python: left
    on_terminate = signal.signal(signal.SIGTERM, terminate) if handle_term else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return handlers[args.command](args)
    except (UsageError, ModelSpecError) as err:  # bad usage: a path or --model value that names nothing usable
        errors.print(Text("error: ", style="bold red") + Text(str(err)))
        return 2
    except MoecError as err:
        errors.print(Text("error: ", style="bold red") + Text(str(err)))
        return 1
    except KeyboardInterrupt:
        errors.print("interrupted")
        return 130
    except Terminated:
        errors.print("terminated")
        return 128 + signal.SIGTERM
    finally:
        if handle_term:
            signal.signal(signal.SIGTERM, on_terminate)


class Terminated(BaseException):
    """SIGTERM, raised where the CLI is, so that the cleanup of a half-written plan or file runs."""


def terminate(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
