"""The IR examples of docs/IR.md parse, verify and print back as written, so the page cannot drift from the
parser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moec.ir import parse_graph, print_graph, verify

IR_DOC = Path(__file__).resolve().parents[2] / "docs" / "IR.md"
FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
BLOCKS = FENCED.findall(IR_DOC.read_text())


def test_the_page_has_examples():
    assert BLOCKS, f"no fenced blocks found in {IR_DOC}"


@pytest.mark.parametrize("text", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_every_fenced_block_round_trips_and_verifies(text):
    graph = parse_graph(text)
    verify(graph)
    assert print_graph(graph) == text
