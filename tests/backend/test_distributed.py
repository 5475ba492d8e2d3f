"""The expert-parallel runtime on 2 local gloo ranks, against the single-process torch runner."""

import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import moec
from moec.analysis.traces import collect_trace
from moec.backend.distributed import (
    add_combined,
    check_batch,
    local_positions,
    outgoing_rows,
    received_expert_rows,
    route_chunks,
)
from moec.frontend.blocks import ExpertsSpec
from moec.frontend.zoo import build_preset
from moec.ir.parser import parse_graph
from moec.passes import PassContext, build_passes, run_passes
from moec.report import REPORT_FILE
from moec.run import main as run_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def qwen_plan(tmp_path_factory):
    """tiny-qwen2-moe (routed + shared experts), placed on 2 ranks and scheduled in 2 chunks (``plan``), and
    the same placed on 1 rank (``plan_1_rank``, for runs in this process)."""
    folder = tmp_path_factory.mktemp("ep")
    model, example = build_preset("tiny-qwen2-moe")
    example = {key: torch.cat([value, value.flip(0)]) for key, value in example.items()}  # batch 4
    compiled = moec.compile(model, example)
    program = compiled.program
    trace = collect_trace(program, [program.flatten_inputs((), example)])
    recipe = {"passes": [{"expert-placement": {"world_size": 2, "balance_eps": 0.5, "time_limit_s": 5}},
                         {"overlap-schedule": {"chunks": 2}}]}
    run_passes(program, build_passes(recipe), PassContext(calibration=trace))
    compiled.save(folder / "plan")
    run_passes(program, build_passes({"passes": [{"expert-placement": {"world_size": 1, "method": "round-robin"}}]}),
               PassContext())
    compiled.save(folder / "plan_1_rank")
    safetensors.torch.save_file(example, str(folder / "inputs.safetensors"))
    expected = compiled(**example).logits
    return folder, expected


def torchrun(ranks: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--standalone", "-m", "moec.run", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(ranks: int, *args: str, rank_0_file_size: int | None = None) -> list[subprocess.CompletedProcess]:
    """``python -m moec.run ARGS`` started as each rank of a local job, with the environment torchrun gives
    (quicker than torchrun, and each rank's exit code and stderr are its own). ``rank_0_file_size`` caps the
    bytes rank 0 may write to one file (a full disk, for its --output)."""

    def limit_files() -> None:
        if rank_0_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (rank_0_file_size, rank_0_file_size))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(ranks)}
    command = [sys.executable, "-m", "moec.run", *args]
    processes = [subprocess.Popen(command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                  preexec_fn=limit_files if rank == 0 else None, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank in range(ranks)]
    outputs = [process.communicate(timeout=240) for process in processes]
    return [subprocess.CompletedProcess(command, process.returncode, out, err)
            for process, (out, err) in zip(processes, outputs, strict=True)]


@pytest.fixture
def one_rank_job(monkeypatch):
    """The environment torchrun gives a job of one rank, so ``moec.run.main`` runs in this process (which sets
    torch's thread count: restored after the test)."""
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                        "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_an_output_path_that_cannot_be_written_is_refused_before_the_run(qwen_plan, one_rank_job, tmp_path, capsys):
    folder, expected = qwen_plan
    plan, inputs = str(folder / "plan_1_rank"), str(folder / "inputs.safetensors")
    (tmp_path / "file").write_text("")
    for output, message in ((tmp_path, "is a folder; give the file to write"),
                            (tmp_path / "file" / "out.safetensors", "file is a file, not a folder"),
                            (tmp_path / ("x" * 300), "cannot be written: File name too long")):
        assert run_main([plan, "--inputs", inputs, "--output", str(output)]) == 1
        err = capsys.readouterr().err
        assert f"error: --output {output}" in err and message in err and "Traceback" not in err
    assert run_main([plan, "--inputs", inputs, "--output", str(tmp_path / "out.safetensors")]) == 0
    got = safetensors.torch.load_file(str(tmp_path / "out.safetensors"))["output_0"]
    assert (got - expected).abs().max().item() <= 1e-5


def test_inputs_the_plan_cannot_take_are_one_error(qwen_plan, one_rank_job, tmp_path, capsys):
    """Float token ids, and a size the plan fixed (here: the mask's sequence, fixed to 8 in a copy of the plan),
    are one message naming the input, not a traceback from the model's ops."""
    folder, _ = qwen_plan
    plan = shutil.copytree(folder / "plan_1_rank", tmp_path / "plan")
    data = json.loads((plan / "plan.json").read_text())
    mask_type = re.search(r"%attention_mask: i64\[(\w+), (\w+)\]", data["ir"])
    data["ir"] = data["ir"].replace(mask_type.group(0), f"%attention_mask: i64[{mask_type.group(1)}, 8]", 1)
    (plan / "plan.json").write_text(json.dumps(data))
    example = safetensors.torch.load_file(str(folder / "inputs.safetensors"))
    cases = (({**example, "input_ids": example["input_ids"].float()}, "input 'input_ids' is torch.float32, and the "
              "plan takes torch.int64"),
             ({key: value[:, :6].contiguous() for key, value in example.items()}, "input 'attention_mask' has shape [4, 6]"))
    for inputs, message in cases:
        safetensors.torch.save_file(inputs, str(tmp_path / "inputs.safetensors"))
        assert run_main([str(plan), "--inputs", str(tmp_path / "inputs.safetensors")]) == 1
        err = capsys.readouterr().err
        assert "error: cannot use inputs" in err and message in err and "Traceback" not in err


def test_a_0d_input_is_one_error_naming_the_shape_the_plan_takes(qwen_plan, one_rank_job, tmp_path, capsys):
    folder, _ = qwen_plan
    example = safetensors.torch.load_file(str(folder / "inputs.safetensors"))
    safetensors.torch.save_file({**example, "input_ids": torch.tensor(3)}, str(tmp_path / "inputs.safetensors"))
    assert run_main([str(folder / "plan_1_rank"), "--inputs", str(tmp_path / "inputs.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "input 'input_ids' is a 0-d tensor (a single value), and the plan takes i64[" in err
    assert "give input_ids with its batch dimension" in err and "Traceback" not in err


def test_a_triton_plan_is_said_to_run_on_the_torch_runner(qwen_plan, one_rank_job, tmp_path, capsys):
    folder, _ = qwen_plan
    plan = shutil.copytree(folder / "plan_1_rank", tmp_path / "plan")
    data = json.loads((plan / "plan.json").read_text())
    data["metadata"]["backend"] = "triton"
    (plan / "plan.json").write_text(json.dumps(data))
    assert run_main([str(plan), "--inputs", str(folder / "inputs.safetensors")]) == 0
    err = capsys.readouterr().err
    assert err.count("was compiled for the triton backend; expert-parallel runs do not use its Triton kernels, so "
                     "it runs on the torch runner") == 1


def test_two_rank_run_matches_single_process(qwen_plan):
    folder, expected = qwen_plan
    output = folder / ("o" * 240 + ".safetensors")  # a legal name as long as the file system allows, nearly
    done = torchrun(2, str(folder / "plan"), "--inputs", str(folder / "inputs.safetensors"), "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    got = safetensors.torch.load_file(str(output))["output_0"]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_a_dynamic_skip_plan_on_two_ranks_matches_single_process(tmp_path):
    """A dynamic-skip plan on 2 ranks (whose skipped pairs are not sent: ``test_pair_bookkeeping_in_one_process``)
    gives the single process's outputs (routers scaled up so that routing weights differ and a tenth or more of the pairs are dropped)."""
    from moec.passes.dynamic_skip import skip_statistics

    model, example = build_preset("tiny-qwen2-moe")
    example = {key: torch.cat([value, value.flip(0)]) for key, value in example.items()}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(8)
    recipe = {"passes": [{"dynamic-skip": {"threshold": 0.5}},
                         {"expert-placement": {"world_size": 2, "method": "round-robin"}}]}
    compiled = moec.compile(model, example, recipe=recipe)
    program = compiled.program
    assert skip_statistics(program, [program.flatten_inputs((), example)])["skipped_fraction"] >= 0.1
    expected = compiled(**example).logits
    compiled.save(tmp_path / "plan")
    safetensors.torch.save_file(example, str(tmp_path / "inputs.safetensors"))
    done = run_ranks(2, str(tmp_path / "plan"), "--inputs", str(tmp_path / "inputs.safetensors"), "--output",
                     str(tmp_path / "out.safetensors"))
    assert [rank.returncode for rank in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    got = safetensors.torch.load_file(str(tmp_path / "out.safetensors"))["output_0"]
    assert (got - expected).abs().max().item() <= 1e-5


def test_an_error_every_rank_hits_is_printed_once(qwen_plan, tmp_path):
    folder, _ = qwen_plan
    broken = tmp_path / "inputs.safetensors"
    broken.write_bytes(b"not a safetensors file")
    done = run_ranks(2, str(folder / "plan"), "--inputs", str(broken))
    assert [rank.returncode for rank in done] == [1, 1]
    err = "".join(rank.stderr for rank in done)
    assert err.count(f"error: cannot use inputs {broken}: ") == 1 and err.count("error: ") == 1 and "(rank" not in err


def test_a_plan_or_inputs_path_that_names_no_usable_file_is_bad_usage(qwen_plan, one_rank_job, tmp_path, capsys):
    """Exit code 2 and the moec command's message, as for ``moec inspect MISSING``; likewise for ``--inputs``
    naming no file."""
    folder, _ = qwen_plan
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    for plan, problem in ((tmp_path / "missing", "does not exist"), (tmp_path / "file", "is a file, not a plan folder"),
                          (tmp_path / "empty", "is not a moec plan: it has no plan.json")):
        assert run_main([str(plan), "--inputs", str(folder / "inputs.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err == f"error: PLAN {plan} {problem}; pass a plan folder written by `moec compile -o`\n"
    give = "give the safetensors file of the model's keyword inputs"
    for inputs, problem in ((tmp_path / "missing.safetensors", ": no such file"), (tmp_path, " is a folder"),
                            (tmp_path / ("i" * 300), ": File name too long")):
        assert run_main([str(folder / "plan_1_rank"), "--inputs", str(inputs)]) == 2
        assert capsys.readouterr().err == f"error: --inputs {inputs}{problem}; {give}\n"


def test_inputs_the_model_fails_on_are_one_line_per_rank_and_no_output_is_noted(qwen_plan, one_rank_job, tmp_path,
                                                                                 capsys):
    folder, _ = qwen_plan
    example = safetensors.torch.load_file(str(folder / "inputs.safetensors"))
    safetensors.torch.save_file({**example, "input_ids": example["input_ids"] + 10_000}, str(tmp_path / "oov.safetensors"))
    plan = str(folder / "plan_1_rank")
    assert run_main([plan, "--inputs", str(tmp_path / "oov.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error (rank 0): the plan fails on its share of {tmp_path / 'oov.safetensors'}: IndexError: ")
    assert "token ids below its vocabulary size" in err and "Traceback" not in err
    assert run_main([plan, "--inputs", str(folder / "inputs.safetensors")]) == 0
    assert capsys.readouterr().err == "note: no --output given, so the outputs were not written\n"


def test_started_without_torchrun_is_bad_usage_naming_the_command(monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert run_main(["plan", "--inputs", "inputs.safetensors"]) == 2
    assert capsys.readouterr().err == (
        "error: python -m moec.run runs on every rank of a torchrun job, and RANK, WORLD_SIZE, MASTER_ADDR, "
        "MASTER_PORT are not set; start it as torchrun --nproc-per-node R -m moec.run plan --inputs inputs.safetensors\n")
    assert run_main(["plan", "--inputs", "inputs.safetensors", "--output", "out.safetensors"]) == 2
    assert capsys.readouterr().err.endswith("-m moec.run plan --inputs inputs.safetensors --output out.safetensors\n")


def test_a_failed_output_write_fails_every_rank_and_leaves_nothing(qwen_plan, tmp_path):
    """Rank 0 may write at most 4 KiB to a file, and the outputs take more: the write fails after the run."""
    folder, _ = qwen_plan
    output = tmp_path / "new" / "out.safetensors"
    done = run_ranks(2, str(folder / "plan"), "--inputs", str(folder / "inputs.safetensors"), "--output", str(output),
                     rank_0_file_size=4096)
    assert [rank.returncode for rank in done] == [1, 1]
    err = "".join(rank.stderr for rank in done)
    assert err.count(f"error: cannot write --output {output}: ") == 1 and "File too large" in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_ranks_that_fail_differently_are_each_named(monkeypatch):
    """``agree`` on rank 1 of 2 (the all-gather simulated): each failed rank's message follows its rank."""
    from moec.backend import distributed

    def gather(messages, message, group=None):
        messages[:] = ["cannot use inputs a.safetensors", message]

    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed.dist, "all_gather_object", gather)
    with pytest.raises(moec.BackendError, match=r"^2 of 2 ranks failed:\n  rank 0: cannot use inputs a.safetensors\n"
                       r"  rank 1: out of memory$"):
        distributed.agree(moec.MoecError("out of memory"))
    with pytest.raises(moec.BackendError, match=r"^1 of 2 ranks failed:\n  rank 0: cannot use inputs a.safetensors$"):
        distributed.agree(None)
    with pytest.raises(moec.PlanError, match="^cannot use inputs a.safetensors$"):
        distributed.agree(moec.PlanError("cannot use inputs a.safetensors"))


@pytest.mark.slow  # a second torchrun start (~50 s here)
def test_wrong_world_size_fails_on_every_rank(qwen_plan):
    folder, _ = qwen_plan
    done = torchrun(3, str(folder / "plan"), "--inputs", str(folder / "inputs.safetensors"))
    assert done.returncode != 0
    assert done.stderr.count("error: ") == 1 and "placed for 2 ranks but was started with 3" in done.stderr


def test_inputs_the_ranks_cannot_share_are_one_error_naming_them():
    graph = parse_graph("graph @main(%input_ids: i64[b, s], %attention_mask: i64[b, s]) {\n  return %input_ids\n}")
    ids, mask = torch.zeros(4, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64)
    with pytest.raises(moec.MoecError, match=r"differ in rows along dim 0 \(input_ids 4, attention_mask 2\)"):
        check_batch([ids, mask], graph, 2)
    with pytest.raises(moec.MoecError, match="a batch of 1 cannot be shared by 2 ranks"):
        check_batch([ids[:1], mask[:1]], graph, 2)
    with pytest.raises(moec.MoecError, match=r"input 'input_ids' is a 0-d tensor \(a single value\), and the plan "
                       r"takes i64\[b, s\] \(2 dims, the batch first\)"):
        check_batch([torch.tensor(3), mask], graph, 2)
    check_batch([ids, mask[:1].expand(4, 8)], graph, 2)


def test_more_ranks_than_experts_is_told_to_use_the_placed_world_size(qwen_plan):
    """Placing again for more ranks than a layer has experts cannot work: the message does not suggest it."""
    from moec.backend.distributed import load_rank_program

    folder, _ = qwen_plan
    with pytest.raises(moec.PlanError, match=r"placed for 2 ranks but was started with 8; start it with "
                       r"--nproc-per-node 2 \(its layers' 4 experts can be placed on at most 4 ranks\)"):
        load_rank_program(folder / "plan", 0, 8)
    with pytest.raises(moec.PlanError, match=r"started with 3; start it with --nproc-per-node 2 \(place it again "
                       r"for 3 ranks\)"):
        load_rank_program(folder / "plan", 0, 3)


def test_a_placement_made_before_the_experts_changed_is_refused(qwen_plan, tmp_path):
    """A placement of 8 experts on a plan whose layers have 4 (pruned after placing) is one PlanError."""
    from moec.backend.distributed import load_rank_program

    folder, _ = qwen_plan
    plan = shutil.copytree(folder / "plan", tmp_path / "plan")
    data = json.loads((plan / "plan.json").read_text())
    placement = data["metadata"]["expert_parallel"]["placement"]
    placement["ranks"] = [row + row for row in placement["ranks"]]
    (plan / "plan.json").write_text(json.dumps(data))
    with pytest.raises(moec.PlanError, match=r"the placement holds 8 experts for MoE block .*, which has 4; a pass "
                       r"changed the experts after expert-placement"):
        load_rank_program(plan, 0, 2)


def test_a_placement_that_leaves_a_rank_idle_is_refused(qwen_plan, tmp_path):
    """A placement (edited, or written by another tool) giving rank 1 no expert of a layer is one PlanError: that
    rank could not run its share of the layer."""
    from moec.backend.distributed import load_rank_program

    folder, _ = qwen_plan
    plan = shutil.copytree(folder / "plan", tmp_path / "plan")
    data = json.loads((plan / "plan.json").read_text())
    placement = data["metadata"]["expert_parallel"]["placement"]
    placement["ranks"] = [[0] * len(row) for row in placement["ranks"]]
    (plan / "plan.json").write_text(json.dumps(data))
    for rank in (0, 1):  # every rank says so, not only the idle one
        with pytest.raises(moec.PlanError, match=r"gives rank\(s\) \[1\] no expert of MoE block .*every rank needs one"):
            load_rank_program(plan, rank, 2)


@pytest.mark.parametrize("weighted_input", [False, True])
@pytest.mark.parametrize("skipping", [False, True])
def test_pair_bookkeeping_in_one_process(weighted_input, skipping):
    """The runtime's dispatch and combine bookkeeping with the all-to-alls simulated by slicing: each owner
    derives every received row's expert from the exchanged counts alone, and the sums match the MoE (the
    routing weight scaling each expert's output, or its input). Pairs a dynamic skip drops are not sent:
    with weighted inputs an expert of a zero row would still add its biases' output."""
    world, experts, k, tokens, hidden, chunks = 3, 7, 2, 11, 4, 2
    spec = ExpertsSpec(num_experts=experts, hidden=hidden, intermediate=1, act="silu", gated=False,
                       weighted_input=weighted_input)
    gen = torch.Generator().manual_seed(0)
    owners = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    local_index = local_positions(owners, world)
    global_id = torch.full((world, int(local_index.max()) + 1), -1)
    global_id[owners, local_index] = torch.arange(experts)
    ranks = [(torch.randn(tokens, hidden, generator=gen),
              torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]),
              torch.rand(tokens, k, generator=gen)) for _ in range(world)]
    kept = [torch.rand(tokens, k, generator=gen) > 0.4 if skipping else torch.ones(tokens, k, dtype=torch.bool)
            for _ in range(world)]
    routes = [route_chunks(ids, weights, owners, local_index, world, chunks, kept[s] if skipping else None)
              for s, (_, ids, weights) in enumerate(ranks)]
    if skipping:
        assert sum(int(route.counts.sum()) for route in routes[0]) == int(kept[0].sum()) < tokens * k
    outputs = [torch.zeros(tokens, hidden) for _ in range(world)]
    for chunk in range(chunks):
        sent = [torch.tensor([0, *routes[s][chunk].counts.sum(1).cumsum(0).tolist()]) for s in range(world)]
        returned = [[] for _ in range(world)]
        for owner in range(world):
            rows = torch.cat([outgoing_rows(ranks[s][0], routes[s][chunk], spec)[sent[s][owner]:sent[s][owner + 1]]
                              for s in range(world)])
            counts = torch.stack([routes[s][chunk].counts[owner] for s in range(world)])
            expert = global_id[owner, received_expert_rows(counts)]
            assert (expert >= 0).all()
            out = (rows.square() + 1) * (expert + 1).unsqueeze(1)  # expert e: (x^2 + 1) * (e + 1), nonzero at 0
            bounds = counts.sum(1).cumsum(0).tolist()
            for s, (start, end) in enumerate(zip([0, *bounds[:-1]], bounds, strict=True)):
                returned[s].append(out[start:end])
        for s in range(world):
            add_combined(outputs[s], torch.cat(returned[s]), routes[s][chunk], spec)
    for (x, ids, weights), y, mask in zip(ranks, outputs, kept, strict=True):
        w = weights.unsqueeze(-1)
        inputs = w * x.unsqueeze(1) if weighted_input else x.unsqueeze(1)
        per_pair = (1 if weighted_input else w) * (inputs.square() + 1) * (ids + 1).unsqueeze(-1)
        torch.testing.assert_close(y, (per_pair * mask.unsqueeze(-1)).sum(1))


def test_chunks_beyond_the_tokens_are_left_out(one_rank_job, monkeypatch):
    """A fixed chunk count above the tokens (a small batch): no all-to-alls for chunks empty on every rank,
    and the same result as one chunk."""
    from moec.backend import distributed

    spec = ExpertsSpec(num_experts=4, hidden=8, intermediate=16, act="silu", gated=True)
    gen = torch.Generator().manual_seed(0)
    weight = {"w_in": torch.randn(4, 32, 8, generator=gen), "w_out": torch.randn(4, 8, 16, generator=gen),
              "b_in": None, "b_out": None}
    tokens, owners = torch.randn(3, 8, generator=gen), torch.zeros(4, dtype=torch.int64)
    indices, routing = torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2, generator=gen)
    exchanges = []
    all_to_all = torch.distributed.all_to_all_single
    monkeypatch.setattr(distributed.dist, "all_to_all_single",
                        lambda *args, **kwargs: exchanges.append(1) or all_to_all(*args, **kwargs))
    torch.distributed.init_process_group("gloo")
    try:
        results = {}
        for chunks in (1, 8):
            exchanges.clear()
            results[chunks] = distributed.expert_parallel_layer(tokens, indices, routing, owners, local_positions(owners, 1),
                                                                weight, spec, chunks)
            assert len(exchanges) == 1 + 2 * min(chunks, 3)  # the counts, then a dispatch and a combine per chunk
    finally:
        torch.distributed.destroy_process_group()
    torch.testing.assert_close(results[8], results[1])


def test_a_placed_plan_the_runtime_cannot_run_is_told_at_compile_time(tmp_path):
    model, example = build_preset("tiny-qwen2-moe")
    recipe = {"passes": [{"quantize": {"bits": 4, "group": 32, "dense": False}},
                         {"expert-placement": {"world_size": 2, "method": "round-robin"}}]}
    with pytest.warns(UserWarning, match=r"placed for expert parallelism, but it has quantized weights \(.*experts.*\), "
                                         r"which the expert-parallel runtime does not run"):
        compiled = moec.compile(model, example, recipe=recipe)
    report = (compiled.save(tmp_path / "plan") / REPORT_FILE).read_text()
    assert "placed on 2 ranks (round-robin), but it has quantized weights" in report and "torchrun" not in report


def test_a_plan_with_a_0d_output_is_refused_at_compile_time_and_by_the_runtime(tmp_path):
    """Given labels, a causal LM returns its loss, one value for the whole batch: no rank's share holds it."""
    from moec.backend.distributed import load_rank_program

    model, example = build_preset("tiny-qwen2-moe")
    example = {**example, "labels": example["input_ids"]}
    recipe = {"passes": [{"expert-placement": {"world_size": 2, "method": "round-robin"}}]}
    with pytest.warns(UserWarning, match=r"but it has a 0-d output \(output 0: .*the loss.*compile without labels\)"):
        compiled = moec.compile(model, example, recipe=recipe)
    with pytest.raises(moec.PlanError, match="has a 0-d output"):
        load_rank_program(compiled.save(tmp_path / "plan"), 0, 2)


@pytest.mark.slow  # about 8 s
def test_a_quantized_plan_is_refused_by_name_before_any_rank_starts(tmp_path):
    """The runtime reads float expert weights: a quantized plan is one PlanError, not a KeyError on some rank."""
    from moec.backend.distributed import load_rank_program

    model, example = build_preset("tiny-qwen2-moe")
    compiled = moec.compile(model, example)
    program = compiled.program
    trace = collect_trace(program, [program.flatten_inputs((), example)])
    recipe = {"passes": [{"quantize": {"bits": 4, "group": 32, "dense": False}},
                         {"expert-placement": {"world_size": 2, "balance_eps": 0.5, "time_limit_s": 5}}]}
    run_passes(program, build_passes(recipe), PassContext(calibration=trace))
    folder = compiled.save(tmp_path / "plan")
    with pytest.raises(moec.PlanError, match=r"has quantized weights \(.*experts.*\), which the expert-parallel runtime "
                       r"does not run"):
        load_rank_program(folder, 0, 2)
