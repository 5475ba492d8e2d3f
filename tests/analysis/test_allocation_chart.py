"""The bit-allocation chart: one bar per unit, as tall as its width, and the plan folder carries it."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

import moec
from moec.analysis.allocation_chart import allocation_svg
from moec.frontend.zoo import build_preset

SVG = "{http://www.w3.org/2000/svg}"


def report(bits: list[int], budget: float = 3.0) -> dict:
    table = [{"unit": f"layers.{i // 2}.experts[{i % 2}]:w_in+w_out", "bits": b} for i, b in enumerate(bits)]
    return {"table": table, "budget": budget, "average_bits": sum(bits) / len(bits), "objective": 0.5,
            "uniform": {"2": {"objective": 2.0, "average_bits": 2.0}, "4": {"objective": 0.1, "average_bits": 4.0}}}


def test_one_bar_per_unit_as_tall_as_its_width():
    bits = [2, 4, 8, 3]
    root = ET.fromstring(allocation_svg(report(bits)))
    bars = root.findall(f"{SVG}rect")
    assert [bar.find(f"{SVG}title").text for bar in bars] == [
        f"layers.{i // 2}.experts[{i % 2}]:w_in+w_out: {b} bits" for i, b in enumerate(bits)]
    heights = [float(bar.get("height")) for bar in bars]
    assert [h / heights[0] for h in heights] == pytest.approx([b / bits[0] for b in bits])
    assert len({bar.get("fill") for bar in bars}) == 4
    assert "uniform 2: 2" in root.find(f"{SVG}text").text


def test_uniform_widths_over_the_budget_are_greyed_and_labelled():
    title = ET.fromstring(allocation_svg(report([2, 4, 2, 4], budget=3.0))).find(f"{SVG}text")
    assert "".join(title.itertext()).endswith("(uniform 2: 2, uniform 4: 0.1 (over budget))")
    (over,) = title.findall(f"{SVG}tspan")
    assert over.text == "uniform 4: 0.1 (over budget)" and over.get("fill") == "#999999"


def test_saved_plan_carries_the_chart(tmp_path):
    model, example = build_preset("tiny-olmoe")
    recipe = {"passes": [{"bit-allocation": {"budget": 2.5, "group": 32, "dense": False, "importance": "routing"}}]}
    compiled = moec.compile(model, example, recipe=recipe, calibration=[example])
    folder = compiled.save(tmp_path / "plan")
    chart = ET.parse(folder / "bit_allocation.svg").getroot()
    assert len(chart.findall(f"{SVG}rect")) == len(compiled.report["bit_allocation"]["table"]) == 16
    assert moec.load(folder).report["bit_allocation"]["budget"] == 2.5  # the checksummed folder loads back
