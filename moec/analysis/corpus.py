"""Built-in English text for calibration and evaluation, available offline: sentences from the docstrings of
Python standard-library modules (written by CPython's authors, shipped with every Python).

The sentence list is deterministic for a given Python version: the docstrings are read in a fresh interpreter
(``python -I -S``, so no package imported by the calling process can add or replace a documented member),
modules in a fixed order, sentences deduplicated, then shuffled with a fixed seed, so calibration and held-out
parts never overlap.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import subprocess
import sys
from functools import cache

# Modules with plenty of prose in their docstrings; any that fail to import are skipped.
MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "ftplib", "functools",
    "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "imaplib",
    "inspect", "ipaddress", "json", "locale", "logging", "mailbox", "mimetypes", "multiprocessing", "netrc",
    "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickletools", "pprint", "pydoc", "queue",
    "random", "re", "sched", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "zipfile",
)

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]+[.!?]$")
SEED = 0


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001  (an optional module missing from this build is simply skipped)
        return []
    docs = [module.__doc__ or ""]
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        docs.append(inspect.getdoc(member) or "")
        if inspect.isclass(member):
            docs.extend(inspect.getdoc(m) or "" for _, m in sorted(vars(member).items()) if callable(m))
    return docs


@cache
def stdlib_sentences(min_words: int = 6, max_words: int = 40) -> tuple[str, ...]:
    """Prose sentences from standard-library docstrings, deduplicated and shuffled with a fixed seed.

    Read in a fresh isolated interpreter: this process may have patched the standard library (transformers adds
    methods to ``logging.Logger``, a CLI replaces ``warnings.showwarning``), which would change the list.
    """
    command = [sys.executable, "-I", "-S", __file__, str(min_words), str(max_words)]
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", check=False)
    if result.returncode != 0:
        raise RuntimeError(f"reading standard-library docstrings failed: {result.stderr.strip()[-2000:]}")
    return tuple(json.loads(result.stdout))


def _extract_sentences(min_words: int, max_words: int) -> list[str]:
    seen: dict[str, None] = {}
    for module_name in MODULES:
        for doc in _docstrings(module_name):
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                for sentence in SENTENCE_END.split(text):
                    if PROSE.match(sentence) and min_words <= len(sentence.split()) <= max_words:
                        seen.setdefault(sentence)
    sentences = list(seen)
    random.Random(SEED).shuffle(sentences)
    return sentences


def calibration_and_held_out(calibration: int, held_out: int) -> tuple[list[str], list[str]]:
    """Two disjoint sentence lists from ``stdlib_sentences``."""
    sentences = stdlib_sentences()
    if calibration + held_out > len(sentences):
        raise ValueError(f"only {len(sentences)} sentences are available, asked for {calibration} + {held_out}")
    return list(sentences[:calibration]), list(sentences[calibration : calibration + held_out])


def tokenized_batches(tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128) -> list[dict]:
    """Padded keyword-input batches (``input_ids``, ``attention_mask`` ...) for a Hugging Face tokenizer."""
    return [
        dict(tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt"))
        for i in range(0, len(sentences), batch_size)
    ]


if __name__ == "__main__":  # run by ``stdlib_sentences`` in a fresh interpreter
    json.dump(_extract_sentences(int(sys.argv[1]), int(sys.argv[2])), sys.stdout)
