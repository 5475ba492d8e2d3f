"""Run an expert-parallel plan on every rank of a torchrun job::

    torchrun --nproc-per-node R -m moec.run PLAN --inputs INPUTS.safetensors [--output OUT.safetensors]

``INPUTS`` holds the model's keyword inputs by name (``input_ids``, ``attention_mask`` ...); each rank runs
its share of the batch; rank 0 writes the whole batch's flat outputs as ``output_0``, ``output_1`` ...
An error every rank hits is printed once, by rank 0 (ranks that fail differently are each named), and
every rank exits with code 1, or 2 for a PLAN that is not a plan folder or ``--inputs`` that names no file (bad
usage, as in the ``moec`` command; also when started without torchrun);
an error a rank hits while running is printed by that rank, and without ``--output`` rank 0 notes that nothing
was written. Every plan runs
on the torch runner's rules: a plan compiled for the triton backend runs without its Triton kernels (rank 0
says so).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist

from moec.backend.distributed import ExpertParallelRunner, agree, check_batch
from moec.cli import UsageError, check_plan_path
from moec.errors import MoecError
from moec.ir.program import Program
from moec.paths import user_path

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets for each rank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moec.run", description="Run an expert-parallel moec plan (under torchrun).")
    parser.add_argument("plan", metavar="PLAN", help="a plan folder with an expert placement")
    parser.add_argument("--inputs", required=True, metavar="FILE", help="safetensors file of the model's keyword inputs")
    parser.add_argument("--output", metavar="FILE", help="rank 0 writes the outputs here (safetensors)")
    args = parser.parse_args(argv)
    unset = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if unset:  # started by hand: init_process_group would fail with pytorch's own message
        output = f" --output {args.output}" if args.output else ""
        say(f"error: python -m moec.run runs on every rank of a torchrun job, and {', '.join(unset)} "
            f"{'is' if len(unset) == 1 else 'are'} not set; start it as torchrun --nproc-per-node R -m moec.run "
            f"{args.plan} --inputs {args.inputs}{output}")
        return 2
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        usage = None
        try:
            check_plan_path(args.plan)
            check_inputs_path(args.inputs)
        except UsageError as err:
            usage = err
        agree(usage)
        runner = ExpertParallelRunner(args.plan)
        if rank == 0 and runner.program.metadata.get("backend") == "triton":
            say(f"note: {args.plan} was compiled for the triton backend; expert-parallel runs do not use its Triton "
                "kernels, so it runs on the torch runner")
        error = None
        try:
            if args.output:
                check_output_path(user_path(args.output))
            kwargs = safetensors.torch.load_file(user_path(args.inputs))
            inputs = runner.program.flatten_inputs((), kwargs)
            check_input_dtypes(runner.program, inputs)
            check_batch(inputs, runner.program.graph, runner.world_size)
        except MoecError as err:
            error = err
        except (OSError, TypeError, ValueError, safetensors.SafetensorError) as err:
            error = MoecError(f"cannot use inputs {args.inputs}: {err}")
        agree(error)
        try:
            outputs = runner.run_sharded(inputs)
        except MoecError as err:  # hit while running: maybe by this rank alone, the others waiting on it
            say(f"error (rank {rank}): {err}")
            return 1
        except Exception as err:  # whatever the model's ops raise on these inputs (torchrun then stops the others)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            say(f"error (rank {rank}): the plan fails on its share of {args.inputs}: {type(err).__name__}: "
                f"{reason}; check that the inputs are valid for the model (token ids below its vocabulary size, "
                "masks of 0 and 1)")
            return 1
        if args.output:  # rank 0 writes, and tells every rank whether it could
            failure: list[str | None] = [None]
            if rank == 0:
                try:
                    write_outputs(outputs, user_path(args.output))
                except (OSError, safetensors.SafetensorError) as err:
                    failure = [f"cannot write --output {args.output}: {err}"]
            dist.broadcast_object_list(failure, src=0)
            if failure[0] is not None:
                raise MoecError(failure[0])
        elif rank == 0:
            say("note: no --output given, so the outputs were not written")
        return 0
    except MoecError as err:  # raised on every rank with one message (``agree``), so rank 0 says it for all
        if rank == 0:
            say(f"error: {err}")
        return 2 if isinstance(err, UsageError) else 1
    finally:
        dist.destroy_process_group()


def say(message: str) -> None:
    """``message`` on stderr in one write, so that the lines of ranks failing together do not interleave."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def check_inputs_path(path: str) -> None:
    """One ``UsageError`` where ``--inputs`` names no file: a missing path or a folder."""
    give = "give the safetensors file of the model's keyword inputs"
    try:
        file = Path(user_path(path))
        if file.is_dir():
            raise UsageError(f"--inputs {path} is a folder; {give}")
        if not file.exists():
            raise UsageError(f"--inputs {path}: no such file; {give}")
    except OSError as err:  # a name the file system refuses (too long, say)
        raise UsageError(f"--inputs {path}: {err.strerror}; {give}") from None


def check_input_dtypes(program: Program, inputs: list[torch.Tensor]) -> None:
    """``ValueError`` naming the first input that is floating-point where the plan takes integers (token ids,
    masks), or the other way round: a cast would change its values."""
    for name, value, tensor in zip(program.graph.input_names, program.graph.inputs, inputs, strict=True):
        expected = getattr(value.type, "torch_dtype", None)
        if expected is not None and tensor.dtype.is_floating_point != expected.is_floating_point:
            raise ValueError(f"input {name!r} is {tensor.dtype}, and the plan takes {expected}; save it as {expected}")


def check_output_path(path: Path) -> None:
    """``MoecError`` unless ``path`` can be written as a file (checked before the run, not after it)."""
    try:
        is_folder = path.is_dir()
    except OSError as err:  # a name the file system refuses (too long, say)
        raise MoecError(f"--output {path} cannot be written: {err.strerror}") from None
    if is_folder:
        raise MoecError(f"--output {path} is a folder; give the file to write, such as {path / 'out.safetensors'}")
    folder = next(parent for parent in path.absolute().parents if parent.exists())
    if not folder.is_dir():
        raise MoecError(f"--output {path} cannot be written: {folder} is a file, not a folder")


def write_outputs(outputs: list[torch.Tensor], path: Path) -> None:
    """Write to a temporary file beside ``path`` and rename, so a failure leaves nothing behind (nor the
    folders made for it)."""
    made = next((folder for folder in reversed(path.absolute().parents) if not folder.exists()), None)
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=".moec-output.", dir=path.parent)  # fits any legal name
        os.close(handle)
        safetensors.torch.save_file({f"output_{i}": t.contiguous() for i, t in enumerate(outputs)}, staging)
        os.replace(staging, path)
    except BaseException:
        if staging is not None:
            Path(staging).unlink(missing_ok=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
