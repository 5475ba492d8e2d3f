"""A plan's report for people: what was compiled, how it was checked, what each pass changed.

``plan_report`` renders a plan's metadata as Markdown (``report.md`` in every plan folder); the functions that
describe one part of it (a pass's changes, a placement, a schedule, the Triton record, a check) give the
lines ``moec compile`` and ``moec inspect`` print too, so the terminal and the file say the same thing.
"""

from __future__ import annotations

from typing import Any

import torch
import yaml

from moec.ir.program import Program

REPORT_FILE = "report.md"
ALLOCATION_CHART = "bit_allocation.svg"  # written by ``CompiledModel.save`` after bit allocation


def plan_report(program: Program, layers: list[dict[str, Any]], files: list[str], calibration: str = "") -> str:
    """Markdown for a plan of ``program``: the model and versions, the checks recorded when it was compiled,
    the recipe and each pass's changes, the calibration the plan stores (``calibration``, its description), the
    ``layers`` table (rows of ``moec.api.layer_summary``), and the report's parts that apply (expert
    parallelism, Triton, ONNX); ``files`` are the plan's other files."""
    from moec import __version__

    metadata = program.metadata
    report = metadata.get("report", {})
    model = metadata.get("model_class", "?")
    backend = metadata.get("backend", "torch")
    lines = [f"# moec plan: {model.rsplit('.', 1)[-1]}", "",
             f"- model: `{model}`",
             f"- saved by moec {__version__} with torch {torch.__version__}; runs on the {backend} backend "
             "(`moec.load(folder)`, or `moec inspect folder` for the IR)",
             f"- inputs: {', '.join(f'`{name}`' for name in program.graph.input_names)}"]
    lines += section("Checks", check_lines(report.get("checks", [])) + quality_lines(report.get("quality")))
    recipe = metadata.get("recipe", {"passes": []})
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None).rstrip(), "```"]
    lines += ["", "## Passes", ""] + pass_table(metadata.get("passes", []), files)
    lines += section("Calibration", [calibration] if calibration else [])
    lines += ["", "## Layers", ""] + layer_table(layers)
    params, size = program.weight_sizes()
    lines += ["", f"All weights: {params:,} parameters, {size:,} bytes."]
    lines += section("Expert parallelism", expert_parallel_run(metadata, program))
    lines += section("Triton", triton_lines(metadata))
    lines += section("ONNX export", onnx_lines(report.get("onnx")))
    return "\n".join(lines) + "\n"


def section(title: str, lines: list[str]) -> list[str]:
    """A Markdown section of ``lines`` as a list (indented lines nest under the line before); nothing when
    there are none."""
    if not lines:
        return []
    return ["", f"## {title}", ""] + [f"  - {line.strip()}" if line.startswith(" ") else f"- {line}"
                                      for line in lines]


def pass_table(records: list[dict[str, Any]], files: list[str]) -> list[str]:
    """One row per pass run (time, and experts/parameters/bytes before and after), then what each changed (with
    the bit-allocation chart when ``files`` holds it)."""
    if not records:
        return ["No passes ran."]
    lines = ["| pass | seconds | experts | parameters | bytes |", "|---|---:|---:|---:|---:|"]
    details = []
    for record in records:
        change = size_change(record)
        lines.append(f"| {record['pass']} | {record['seconds']:.2f} | {change['experts']} | {change['params']} | "
                     f"{change['bytes']} |")
        changed = pass_details(record.get("summary", {}))
        if record["pass"] == "bit-allocation" and ALLOCATION_CHART in files:
            changed.append(f"![bits chosen per unit]({ALLOCATION_CHART})")
        if changed:
            details += ["", f"{record['pass']}:", ""] + [f"- {line}" for line in changed]
    return lines + details


def size_change(record: dict[str, Any]) -> dict[str, str]:
    """A pass record's experts, parameters and bytes: ``before -> after`` where the pass changed them."""
    before, after = record["before"], record["after"]
    return {key: f"{before[key]:,}" + (f" -> {after[key]:,}" if after[key] != before[key] else "")
            for key in ("experts", "params", "bytes")}


def layer_table(rows: list[dict[str, Any]]) -> list[str]:
    """The FFN and MoE layers as a Markdown table, with totals."""
    lines = ["| # | op | weights | experts | top-k | detail | params | bytes |", "|---:|---|---|---:|---:|---|---:|---:|"]
    for index, row in enumerate(rows):
        lines.append(f"| {index} | {row['op']} | `{row['weights']}` | {row['experts']} | {row['top_k']} | "
                     f"{row['detail']} | {row['params']:,} | {row['bytes']:,} |")
    lines.append(f"| | total | | | | | {sum(r['params'] for r in rows):,} | {sum(r['bytes'] for r in rows):,} |")
    return lines


def expert_parallel_run(metadata: dict[str, Any], program: Program) -> list[str]:
    """For a plan placed for expert parallelism, how to run it, or why the expert-parallel runtime cannot (each
    layer's placement and schedule are in the passes' lines)."""
    settings = metadata.get("expert_parallel", {})
    if "placement" not in settings:
        return []
    from moec.backend.distributed import runtime_refusal

    world_size = settings["world_size"]
    placed = f"placed on {world_size} ranks ({settings['placement']['method']})"
    refusal = runtime_refusal(program.graph)
    if refusal is not None:
        return [f"{placed}, but it has {refusal}, which the expert-parallel runtime does not run: run it in one "
                "process (`moec.load`), or compile it without them to distribute it"]
    return [f"{placed}; run it with `torchrun --nproc-per-node {world_size} -m moec.run PLAN --inputs "
            "inputs.safetensors --output out.safetensors`"]


def check_lines(checks: list[dict[str, Any]]) -> list[str]:
    """The compiled model against the original, one line per set of inputs ``moec compile`` compared: a parity
    check with its tolerance, or the deviation of a recipe that changes the outputs by design."""
    lines = []
    for check in checks:
        if check["kind"] == "deviation":
            relative = (f" ({check['max_abs_diff'] / check['scale']:.2%} of the largest output)"
                        if check["scale"] else "")
            padding = "; padding positions left out" if check["masked"] else ""
            lines.append(f"deviation on {check['inputs']} ({check['shapes']}): output cosine {check['cosine']:.4f}, "
                         f"max abs diff {check['max_abs_diff']:.3g}{relative}{padding}")
        else:
            verdict = "ok" if check["passed"] else "FAILED"
            lines.append(f"parity on {check['inputs']} ({check['shapes']}): max abs diff {check['max_abs_diff']:.3g} "
                         f"{verdict} (tolerance {check['tolerance']:g})")
    return lines


def quality_lines(quality: dict[str, Any] | None) -> list[str]:
    """The quality ``moec compile`` measured on held-out text: embedding cosine and nearest-neighbour agreement
    with the original, for the plan's routers and, for a routed plan, random and oracle routing."""
    if quality is None:
        return []
    held_out = f"on {quality['sentences']} held-out sentences" if "sentences" in quality else "on held-out text"
    routed = "random" in quality  # the baselines exist only for a plan with routers
    fraction = f" (active FFN fraction {quality['active_ffn_fraction']:.3f})" if routed else ""
    lines = [f"quality vs the original model {held_out}{fraction}:"]
    names = {"router": "the plan's routers" if routed else "the compiled model",
             "random": "random routers", "oracle": "oracle routers (top-k by true expert output norm)"}
    for label in ("router", "random", "oracle"):
        if label in quality:
            lines.append(f"  {names[label]}: embedding cosine {quality[label]['cosine']:.4f}, nearest-neighbour "
                         f"agreement {quality[label]['nn_agreement']:.1%}")
    if "gap_closed" in quality:
        lines.append(f"  the router closes {quality['gap_closed']:.0%} of the random-to-oracle cosine gap")
    return lines


def onnx_lines(onnx: dict[str, Any] | None) -> list[str]:
    """The last ONNX export of this model before it was saved: file, lowering, fused ops and its parity check."""
    if onnx is None:
        return []
    fused = " and ".join(f"{count} {op}" for op, count in onnx["fused_moe_ops_by_op"].items()) or "no fused MoE ops"
    diffs = ", ".join(f"{shape}: {diff:.3g}" for shape, diff in onnx["parity_max_abs_diff"].items())
    lines = [f"`{onnx['path']}`: {onnx['lowering']} lowering, opset {onnx['opset']}, {fused}",
             f"onnxruntime parity vs the torch runner (batch x sequence: max abs diff) {diffs} "
             f"(tolerance {onnx['tolerance']:g}), after onnx.checker and shape inference"]
    return lines + onnx_fallback_lines(onnx)


def onnx_fallback_lines(onnx: dict[str, Any]) -> list[str]:
    """The MoE blocks an ``ort`` export wrote with the portable lowering, and why."""
    return [f"{block}: portable MoE lowering ({reason})"
            for block, reason in onnx["portable_fallbacks"].items()]


def pass_details(summary: dict[str, Any]) -> list[str]:
    """What a pass changed: the ops simplify or dead-code removed, one line per layer of an expert-compression
    pass (the experts it removed or merged),
    of expert-placement (each rank's experts and the load balance) or of overlap-schedule (its chunk count and
    why), or a few lines for bit-allocation (the widths chosen and the check against uniform bits) and dynamic
    skipping; nothing for other passes."""
    lines = []
    if summary.get("ops_removed"):
        lines.append(removed_ops_line(summary))
    elif summary.get("weights_removed"):
        lines.append(f"removed {plural(summary['weights_removed'], 'weight')} nothing reads")
    if summary.get("moves") is not None:
        lines.append(f"{summary['moves']:,.0f} expected token moves between ranks at layer boundaries "
                     "on the calibration data")
    layers = summary.get("layers")  # per-layer rows; other passes may give a count here
    for row in layers if isinstance(layers, list) else []:
        if "chunks" in row:
            lines.append(schedule_line(row))
            continue
        if "experts_by_rank" in row:
            lines.append(placement_line(row))
            continue
        if "experts_before" not in row or row["experts_before"] == row["experts_after"]:
            continue
        if "removed" in row:
            what = f"removed {'expert' if len(row['removed']) == 1 else 'experts'} {', '.join(map(str, row['removed']))}"
        else:
            what = "merged " + ", ".join("+".join(map(str, group)) for group in row["groups"] if len(group) > 1)
        scale = row.get("output_norm_ratio")  # plans saved before the ratio was recorded lack it
        lines.append(f"{row['layer']}: {row['experts_before']} -> {row['experts_after']} experts ({what}), "
                     f"output cosine {row['output_cosine']:.4f}" + (f", norm x{scale:.3f}" if scale is not None else ""))
    if "units_by_bits" in summary:
        lines.extend(bit_allocation_lines(summary))
    if "top_1_ops" in summary and summary["expert_ops"]:
        lines.append(f"skip threshold {summary['threshold']} on {summary['expert_ops']} moe.experts ops"
                     + (f" ({summary['top_1_ops']} with top-1 routing left alone)" if summary["top_1_ops"] else ""))
        lines.extend(skip_rate_lines(summary))
    return lines


def removed_ops_line(summary: dict[str, Any]) -> str:
    """simplify's removals by rule, or dead-code's ops and weights nothing reads."""
    rules = {key.removeprefix("removed_"): count for key, count in summary.items() if key.startswith("removed_")}
    if rules:
        by_rule = ", ".join(f"{count} {rule}" for rule, count in rules.items())
        return f"removed {plural(summary['ops_removed'], 'op')} that return their input unchanged ({by_rule})"
    weights = f" and {plural(summary['weights_removed'], 'weight')}" if summary.get("weights_removed") else ""
    return f"removed {plural(summary['ops_removed'], 'op')}{weights} nothing reads"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def bit_allocation_lines(summary: dict[str, Any]) -> list[str]:
    """bit-allocation's choice: the average width and how many units got each width, then how it compared with
    uniform bits at the model output."""
    widths = ", ".join(f"{count} at {bits} bits" for bits, count in summary["units_by_bits"].items())
    lines = [f"average {summary['average_bits']:.3f} bits (budget {summary['budget']:g}) over {summary['units']} "
             f"units: {widths}; objective {summary['objective']:.4g}"]
    if "same_as" in summary:
        lines.append(f"the allocation is {summary['same_as']}: nothing to compare at the model output")
    elif "measured" in summary:
        compared = " vs ".join(f"{label} {error:.4g}" for label, error in summary["measured"].items())
        lines.append(f"mean cosine distance of the output on the calibration data: {compared}; "
                     f"kept {'the allocation' if summary['kept'] == 'allocation' else summary['kept']}")
    return lines


def placement_line(row: dict[str, Any]) -> str:
    """One layer of an expert placement: the experts each rank holds and, where a trace was placed, the busiest
    rank's routed load over the mean and the bound it was held to."""
    ranks = "; ".join(f"rank {rank}: {', '.join(map(str, experts)) or 'none'}"
                      for rank, experts in enumerate(row["experts_by_rank"]))
    if "load" not in row:
        return f"{row['layer']} experts by rank: {ranks}"
    relaxed = ", relaxed: 10% was out of reach" if row["relaxed"] else ""
    return (f"{row['layer']} experts by rank: {ranks}; busiest rank {row['load']:.3f}x the mean load "
            f"(bound {row['bound']:.3f}x{relaxed})")


def skip_rate_lines(summary: dict[str, Any]) -> list[str]:
    """dynamic-skip's measured skip rate: overall, then one line per skipping layer; or why it was not measured."""
    if not summary.get("measured"):
        reason = summary.get("not_measured_because", "no calibration samples were given")
        return [f"skip rate not measured: {reason} (give calibration data to measure it)"]

    def rate(row: dict[str, Any]) -> str:
        return (f"{row['skipped']:,} of {row['evaluations']:,} expert evaluations skipped "
                f"({row['skipped_fraction']:.1%}), dropping {row['dropped_weight']:.1%} of the routing weight")

    batches = f"{summary['samples']} batch{'es' if summary['samples'] != 1 else ''}"
    after = f", after {summary['measured_after']}" if summary.get("measured_after") else ""
    lines = [f"on the calibration data ({batches}, real tokens only{after}): {rate(summary)}"]
    lines += [f"{row['layer']}: {rate(row)}" for row in summary["layers"] if row["threshold"]]
    return lines


def schedule_line(row: dict[str, Any]) -> str:
    """One layer's overlap schedule: its chunk count, what chose it and, for the cost model, the predicted time
    against the serial one."""
    chunks = f"{row['chunks']} chunk{'s' if row['chunks'] != 1 else ''}"
    if row["chosen_by"] == "chunks":
        why = "set by the chunks option"
    else:
        predicted, serial = row["predicted_s"], row["baseline_s"]
        why = (f"chosen by the cost model: {predicted * 1e3:.3g} ms predicted vs {serial * 1e3:.3g} ms serial"
               + (f" ({predicted / serial:.2f}x)" if serial else ""))
        if row["streams"] <= 1:
            why += ", ranks sharing cores gain nothing from overlap"
    shared = {None: "", True: "; shared expert overlaps dispatch", False: "; shared expert runs after the layer"}
    return f"{row['layer']}: {chunks}, {why}{shared[row['shared_overlap']]}"


def triton_lines(metadata: dict[str, Any]) -> list[str]:
    """A triton plan's record of its MoE ops: how many run Triton kernels, and each one kept on the torch runner
    and why; nothing for other backends or plans saved before the record existed."""
    record = metadata.get("report", {}).get("triton")
    if metadata.get("backend") != "triton" or record is None:
        return []
    fallbacks = record["fallbacks"]
    lines = [f"triton kernels: {record['kernel_ops']} of {record['kernel_ops'] + len(fallbacks)} MoE ops"
             + (f"; {len(fallbacks)} run on the torch runner:" if fallbacks else "")]
    for row in fallbacks:
        where = f" of {row['block']}" if row["block"] else ""
        lines.append(f"  op {row['op']} {row['op_name']}{where}: {row['reason']}")
    return lines


def expert_parallel_lines(program: Any) -> list[str]:
    """A plan's placement (ranks, method, each layer's experts by rank and load balance) and each layer's overlap
    schedule; nothing for a plan without them."""
    from moec.ir.ops import SharedExpertOp

    settings = program.metadata.get("expert_parallel", {})
    with_shared = {op.block for op in program.graph.ops_of(SharedExpertOp)}
    if "placement" not in settings:
        return []
    lines = [f"expert parallel: {settings['world_size']} ranks, {settings['placement']['method']} placement"
             + ("" if settings.get("schedule") else ", no overlap schedule (one chunk per layer)")]
    lines += [f"  {placement_line(row)}" for row in settings.get("placement_stats", {}).get("layers", [])]
    for layer, schedule in settings.get("schedule", {}).items():
        shared = "" if layer not in with_shared else ("; shared expert overlaps dispatch" if schedule["overlap"]
                                                      else "; shared expert runs after the layer")
        predicted = (f", {schedule['predicted_s'] * 1e3:.3g} ms predicted vs {schedule['baseline_s'] * 1e3:.3g} ms "
                     "serial" if schedule["baseline_s"] else "")
        lines.append(f"  {layer}: {schedule['chunks']} chunk{'s' if schedule['chunks'] != 1 else ''}{predicted}{shared}")
    return lines
