"""What the benchmarks here share: refusing to time a wrong result, checking the output path before a run
that may take minutes, thread counts that must be positive, and the facts a JSON result records about the
run (versions, CPU, threads, load)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
from pathlib import Path

import torch


def require_close(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float, where: str = "") -> float:
    """The max abs difference of ``got`` from ``want`` relative to ``want``'s largest value; a ``SystemExit``
    naming ``name`` when it exceeds ``tolerance``: a ratio of a wrong result is no figure."""
    error = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))
    if not error <= tolerance:
        raise SystemExit(f"{name}{' ' + where if where else ''} differs from the reference by {error:.3g} relative "
                         f"(> {tolerance:g}); not timing a wrong result")
    return error


def output_file(path: str) -> Path:
    """``path`` for the JSON result, its folder made and tried now, before the run, so a bad path costs no run."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise SystemExit(f"--out {path} is a folder; give the path of the JSON file to write")
    blocking = next((p for p in file.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise SystemExit(f"--out {path}: {blocking} is a file, not a folder; choose another path")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        probe = file.with_name(f".{file.name}.{os.getpid()}.probe")
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"--out {path}: cannot write there ({err.strerror or err}); choose another path") from None
    return file


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (thread counts, repeats, sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def token_counts(text: str) -> list[int]:
    """An argparse type: comma-separated token counts, each at least 1."""
    return [positive_int(part) for part in text.split(",")]


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_facts(**settings: object) -> dict[str, object]:
    """What a result file records about its run: package versions, CPU, threads, load, and ``settings``."""
    versions = {}
    for package in ("moec", "torch", "transformers", "onnxruntime", "onnx", "ortools"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"versions": versions, "cpu": cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(), **settings}
