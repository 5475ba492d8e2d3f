"""Plan folders: a program saved as ``plan.json`` (IR text, I/O specs, versions, checksums) and
``weights.safetensors``. Written to a temporary folder beside the target and renamed into place, so a
failed save leaves nothing behind; loaded without pickle, checking format version and checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import safetensors
import safetensors.torch
import torch

from moec.errors import ParseError, PlanError, VerifyError
from moec.ir.core import Graph
from moec.ir.parser import parse_graph
from moec.ir.printer import print_graph
from moec.ir.program import Program, load_treespec
from moec.ir.quant import QuantizedType, storage_names
from moec.ir.types import TensorType
from moec.ir.verifier import verify
from moec.kernels.quant import check_storage
from moec.paths import user_path

T = TypeVar("T")

FORMAT = "moec-plan"
FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "weights.safetensors"
PLAN_FIELDS = {"ir": str, "in_spec": str, "out_spec": str, "metadata": dict, "files": dict}  # and their types
# The metadata entries code reads as these types, where a plan has them (passes record more, read as data).
METADATA_FIELDS = {"input_guards": list, "input_guards_kept_at_one": list, "blocks": list, "model_class": str,
                   "forward_parameters": list, "example_shapes": list, "passes": list, "recipe": dict, "backend": str,
                   "report": dict, "expert_parallel": dict, "kernels": dict}
JSON_KINDS = {dict: "JSON object", list: "list", str: "string"}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_plan_target(path: str | os.PathLike) -> Path:
    """``path`` resolved, if a plan folder can be written there: a new path under folders (missing ones are
    created), an empty folder or an existing plan holding nothing but its own entries (replaced); else one
    ``PlanError`` saying why. Whether the nearest existing folder takes new entries is tried (a temporary
    folder made and removed)."""
    target = user_path(path).resolve()
    if target.is_dir() and Path.cwd().resolve().is_relative_to(target):
        raise PlanError(f"{target} is the current folder (or holds it), which writing a plan there would replace "
                        "under this process; give a folder of its own, such as ./plan")
    if target.is_dir():
        if not (target / PLAN_FILE).exists():
            if any(target.iterdir()):
                raise PlanError(f"{target} exists and is not a moec plan folder; choose another output path")
        elif foreign := sorted({entry.name for entry in target.iterdir()} - plan_entries(target)):
            raise PlanError(f"{target} is a plan folder that also holds {', '.join(foreign)}, which writing the "
                            "plan again would delete; move them out, or choose another output path")
    elif target.exists():
        raise PlanError(f"{target} is a file, not a folder; choose another output path for the plan")
    else:
        blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise PlanError(f"cannot write a plan at {target}: {blocking} is a file; choose another output path")
    parent = next(p for p in target.parents if p.is_dir())  # where the staging folder, or missing ones, go
    try:
        tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=parent).cleanup()
    except OSError as err:
        raise PlanError(f"cannot write a plan at {target}: {parent}: {err.strerror or err}; choose another "
                        "output path") from None
    return target


# plan.json lists the plan's documents since 2026-12-06; before that, the only one moec wrote was this
DOCUMENTS_BEFORE_LISTING = ("report.md",)


def plan_entries(folder: Path) -> set[str]:
    """The names a plan folder's own ``plan.json`` accounts for: itself, its files and its documents. For a
    ``plan.json`` that does not read as a moec plan (another tool's, or a damaged one) only the names every
    plan has, so that replacing the folder never deletes what moec did not write."""
    try:
        plan = json.loads((folder / PLAN_FILE).read_text())
        if plan["format"] != FORMAT:
            raise ValueError("another format")
        files, documents = list(plan["files"]), list(plan.get("documents", DOCUMENTS_BEFORE_LISTING))
    except (OSError, ValueError, KeyError, TypeError):
        return {PLAN_FILE, WEIGHTS_FILE, *DOCUMENTS_BEFORE_LISTING}
    return {PLAN_FILE, *(name for name in files if isinstance(name, str)), *documents}


def save_plan(program: Program, path: str | os.PathLike, extra_files: dict[str, str | bytes] | None = None,
              documents: dict[str, str] | None = None) -> Path:
    """Write ``program`` as a plan folder at ``path`` (replacing an existing plan there). ``extra_files`` are
    listed with their checksums, which loading checks; ``documents`` (a report for people) are written beside
    them unlisted: loading never reads them, so editing one breaks nothing."""
    from moec import __version__

    target = check_plan_target(path)
    made = next((folder for folder in reversed(target.parents) if not folder.exists()), None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        used = stored_weight_names(program.graph)
        tensors = unshared({name: t for name, t in program.weights.items() if name in used})
        safetensors.torch.save_file(tensors, str(staging / WEIGHTS_FILE))
        for name, content in {**(extra_files or {}), **(documents or {})}.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(staging / name, mode) as file:
                file.write(content)
        plan = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "moec_version": __version__,
            "torch_version": torch.__version__,
            "ir": print_graph(program.graph),
            "in_spec": program.in_spec,
            "out_spec": program.out_spec,
            "metadata": program.metadata,
            "files": {name: sha256_of(staging / name) for name in [WEIGHTS_FILE, *(extra_files or {})]},
            "documents": sorted(documents or {}),
        }
        (staging / PLAN_FILE).write_text(json.dumps(plan, indent=1))
        make_readable(staging)
        replace_dir(staging, target)
    except BaseException as err:
        shutil.rmtree(made if made is not None else staging, ignore_errors=True)
        if isinstance(err, (OSError, safetensors.SafetensorError)):  # a full disk, a quota: nothing was written
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise PlanError(f"cannot write the plan at {target}: {reason}; nothing was written") from None
        raise
    return target


def stored_weight_names(graph: Graph) -> set[str]:
    """The tensor names a graph's used weights are stored under (a quantized weight has three)."""
    names: set[str] = set()
    for name in graph.used_weights():
        weight_type = graph.weights.get(name)
        names.update(storage_names(name).values() if isinstance(weight_type, QuantizedType) else [name])
    return names


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return out


def make_readable(folder: Path) -> None:
    """Give the staged folder the permissions a normal ``mkdir``/``open`` would (mkdtemp uses 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def replace_dir(staging: Path, target: Path) -> None:
    """Put the staged folder at ``target``, replacing a folder there (which stays whole if this fails)."""
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:  # interrupted between the renames: the previous plan goes back to its path
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_consistently(folder: Path, read: Callable[[], T], files_read: Callable[[T], set[str]]) -> T:
    """``read()`` of the plan at ``folder``, refused with one ``PlanError`` where another process replaced the
    files it read (plan.json, the weights and ``files_read`` of its result) meanwhile: a save
    to the same path, so that what was read could mix two plans' files. Other entries may change freely."""
    before = folder_state(folder)
    try:
        result = read()
    except (PlanError, OSError) as err:
        if changed(before, folder_state(folder), {PLAN_FILE, WEIGHTS_FILE}):
            raise replaced_while_read(folder) from None
        if isinstance(err, OSError):
            raise PlanError(f"{folder}: cannot read the plan ({err.strerror or err})") from None
        raise
    if changed(before, folder_state(folder), {PLAN_FILE, WEIGHTS_FILE, *files_read(result)}):
        raise replaced_while_read(folder)
    return result


def folder_state(folder: Path) -> dict[str, tuple[int, int, int]] | None:
    """What identifies each entry of the folder now (inode, size, modification time), or None where the folder
    is missing: a save writes new files, so their inodes change."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name: (entry.inode(), stat.st_size, stat.st_mtime_ns)
                    for entry in entries for stat in [entry.stat(follow_symlinks=False)]}
    except OSError:
        return None


def changed(before: dict | None, after: dict | None, names: set[str]) -> bool:
    """Whether any of ``names`` differs between two ``folder_state``s (or the folder came or went)."""
    if before is None or after is None:
        return before is not after
    return any(before.get(name) != after.get(name) for name in names)


def replaced_while_read(folder: Path) -> PlanError:
    return PlanError(f"{folder} was written again while it was being loaded (another process saved a plan to it), "
                     "so what was read may mix two plans; load it again once that save has finished")


def read_plan_json(path: str | os.PathLike, check_files: bool = True) -> tuple[Path, dict[str, Any]]:
    """The plan folder and its checked ``plan.json``: format, version, and (unless ``check_files`` is False,
    for a caller that loads the plan next, which checks them) the checksums of its files."""
    folder = user_path(path)
    plan_file = folder / PLAN_FILE
    if folder.is_file():
        raise PlanError(f"{folder} is a file; give the plan folder (the one holding {PLAN_FILE})")
    if not plan_file.is_file():
        raise PlanError(f"{folder} is not a moec plan: {PLAN_FILE} is missing (write one with `moec compile -o`)")
    try:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, or nested past the decoder's depth
        raise PlanError(f"{plan_file} is not valid JSON ({type(err).__name__}: {str(err)[:200]}); the plan is "
                        "corrupt, compile it again") from None
    if not isinstance(plan, dict):
        raise PlanError(f"{plan_file} holds a JSON {type(plan).__name__}, not a plan; the plan is corrupt, "
                        "compile it again")
    if plan.get("format") != FORMAT:
        raise PlanError(f"{plan_file} is not a moec plan (format {plan.get('format')!r})")
    version = plan.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PlanError(f"{plan_file}: its 'format_version' entry is {json.dumps(version)}, expected a positive integer "
                        f"(this moec writes {FORMAT_VERSION}); the plan is corrupt, compile it again")
    if version > FORMAT_VERSION:
        raise PlanError(
            f"{folder} has plan format version {version}, newer than this moec reads ({FORMAT_VERSION}); "
            "upgrade moec or compile the plan again with this version"
        )
    for key, kind in PLAN_FIELDS.items():
        if not isinstance(plan.get(key), kind):
            found = "missing" if key not in plan else f"a JSON {type(plan[key]).__name__}"
            raise PlanError(f"{plan_file}: its {key!r} entry is {found}, expected a {kind.__name__}; the plan is "
                            "corrupt, compile it again")
    for key, kind in METADATA_FIELDS.items():
        if key in plan["metadata"] and not isinstance(plan["metadata"][key], kind):
            found = type(plan["metadata"][key]).__name__
            raise PlanError(f"{plan_file}: its metadata entry {key!r} is a JSON {found}, expected a {JSON_KINDS[kind]}; "
                            "the plan is corrupt, compile it again")
    if WEIGHTS_FILE not in plan["files"]:
        raise PlanError(f"{plan_file} lists no checksum for {WEIGHTS_FILE}; the plan is corrupt, compile it again")
    for name, expected in plan["files"].items():  # every entry checked before any file is read
        file_in_plan(folder, name, plan_file)
        if not isinstance(expected, str):
            raise PlanError(f"{plan_file}: the 'files' entry for {name!r} is {json.dumps(expected)}, expected a sha256 "
                            "checksum string; the plan is corrupt, compile it again")
    for name, expected in plan["files"].items() if check_files else ():
        file = folder / name
        try:
            if not file.is_file():
                raise PlanError(f"{folder}: {name} is missing; the plan is incomplete, compile it again")
            actual = sha256_of(file)
        except (OSError, ValueError) as err:  # a name no file system takes (too long, a NUL in it)
            raise PlanError(f"{plan_file}: its 'files' entry {name[:80]!r} cannot be read ({err}); the plan is "
                            "corrupt, compile it again") from None
        if actual != expected:
            raise PlanError(
                f"{folder}: sha256 checksum mismatch for {name} (expected {expected[:12]}..., found "
                f"{actual[:12]}...): the file was changed or corrupted; compile the plan again"
            )
    return folder, plan


def file_in_plan(folder: Path, name: str, plan_file: Path) -> Path:
    """The file ``name`` of a plan's 'files' entry, refused with ``PlanError`` unless it lies inside ``folder``
    (no absolute path, no '..', no link out of the folder), so a plan never makes moec read another file."""
    file = folder / name
    try:
        inside = file.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):  # a name no file system takes: refused below as not the plan's own
        inside = False
    if Path(name).is_absolute() or ".." in Path(name).parts or not inside:
        raise PlanError(f"{plan_file}: its 'files' entry names {name!r}, which is outside the plan folder; "
                        "a plan lists only its own files, so this one is corrupt or was tampered with; "
                        "compile it again")
    return file


def load_plan(path: str | os.PathLike) -> tuple[Program, set[str]]:
    """Load and verify a plan folder written by ``save_plan``: its program, and the files its plan.json lists
    with their checksums beside the weights (a file of the folder it does not list is no part of the plan and
    is never read)."""
    folder, plan = read_plan_json(path)
    try:
        graph = parse_graph(plan["ir"])
        verify(graph)
    except (ParseError, VerifyError) as err:
        first_line = str(err).splitlines()[0]  # a parse error goes on to quote the line it points into
        raise PlanError(f"{folder / PLAN_FILE}: its IR does not load ({first_line}); the plan is corrupt, compile "
                        "it again") from None
    except Exception as err:  # what else an edited IR makes an op's constructor or the verifier raise
        raise PlanError(f"{folder / PLAN_FILE}: its IR does not load ({type(err).__name__}: {err}); the plan is "
                        "corrupt, compile it again") from None
    try:
        weights = safetensors.torch.load_file(str(folder / WEIGHTS_FILE))
    except Exception as err:  # safetensors' own errors for a truncated or foreign file
        raise PlanError(f"{folder}: {WEIGHTS_FILE} does not read as safetensors ({type(err).__name__}: {err}); the "
                        "plan is corrupt, compile it again") from None
    missing = stored_weight_names(graph) - set(weights)
    if missing:
        raise PlanError(f"{folder}: {WEIGHTS_FILE} lacks weights {sorted(missing)[:5]}; compile the plan again")
    used = graph.used_weights()
    for name, weight_type in graph.weights.items():
        try:
            if isinstance(weight_type, QuantizedType):
                check_storage(name, weight_type, weights)
            elif name in used:
                check_stored(name, weight_type, weights[name])
        except ValueError as err:
            raise PlanError(f"{folder}: {err}; the plan is corrupt, compile it again") from None
    for key in ("in_spec", "out_spec"):
        try:
            load_treespec(plan[key])
        except Exception as err:  # whatever a corrupt spec makes pytree raise
            raise PlanError(f"{folder}: its {key} cannot be read ({type(err).__name__}: {err}); the plan is "
                            "corrupt, compile it again") from None
    program = Program(graph, weights, plan["in_spec"], plan["out_spec"], plan["metadata"])
    return program, set(plan["files"]) - {WEIGHTS_FILE}


def check_stored(name: str, weight_type: TensorType, tensor: torch.Tensor) -> None:
    """``ValueError`` when the tensor stored for weight ``name`` is not of its declared type."""
    if tuple(tensor.shape) != weight_type.static_shape or tensor.dtype != weight_type.torch_dtype:
        raise ValueError(f"weight @{name} is declared {weight_type}, but {WEIGHTS_FILE} stores it as "
                         f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}")
