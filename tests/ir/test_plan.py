"""Plan folders: round trip, atomic writes, and one clear error for each kind of damage."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import moec
from moec.ir import plan as plan_module
from moec.ir.plan import PLAN_FILE, WEIGHTS_FILE
from moec.report import REPORT_FILE


@pytest.fixture(scope="module")
def compiled(preset):
    model, example = preset("tiny-qwen2-moe")
    return moec.compile(model, example), example


def test_save_load_round_trip(compiled, tmp_path):
    model, example = compiled
    folder = model.save(tmp_path / "plan")
    assert sorted(p.name for p in folder.iterdir()) == [PLAN_FILE, REPORT_FILE, WEIGHTS_FILE]
    again = moec.load(folder)
    assert again.ir == model.ir
    assert torch.equal(again(**example).logits, model(**example).logits)
    with open(folder / WEIGHTS_FILE, "rb") as file:
        assert not file.read(16).startswith(b"\x80")  # safetensors, not a pickle


def test_saving_over_a_plan_replaces_it_and_leaves_no_temporaries(compiled, tmp_path):
    model, _ = compiled
    model.save(tmp_path / "plan")
    model.save(tmp_path / "plan")
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]


def test_failed_save_leaves_nothing(compiled, tmp_path):
    model, _ = compiled
    model.program.metadata["bad"] = object()  # not JSON-serializable: the save fails midway
    try:
        with pytest.raises(TypeError):
            model.save(tmp_path / "plan")
    finally:
        del model.program.metadata["bad"]
    assert list(tmp_path.iterdir()) == []


def test_a_save_the_disk_refuses_is_one_error_and_leaves_no_folder_it_made(compiled, tmp_path, monkeypatch):
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plan_module.safetensors.torch, "save_file", full_disk)
    with pytest.raises(moec.PlanError, match=r"cannot write the plan at .*plan: No space left on device; nothing was"):
        compiled[0].save(tmp_path / "new" / "deep" / "plan")
    assert list(tmp_path.iterdir()) == []


def test_the_current_folder_is_refused_as_a_plan_folder(compiled, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(moec.PlanError, match="is the current folder .*give a folder of its own, such as ./plan"):
        compiled[0].save(".")
    assert list(tmp_path.iterdir()) == []
    assert moec.load(compiled[0].save("plan")).ir == compiled[0].ir


def test_refuses_to_overwrite_a_folder_that_is_not_a_plan(compiled, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(moec.PlanError, match="is not a moec plan folder"):
        compiled[0].save(tmp_path)


def test_refuses_to_overwrite_a_plan_beside_entries_it_does_not_list(compiled, tmp_path):
    folder = compiled[0].save(tmp_path / "plan")
    (folder / "model.onnx").write_bytes(b"exported")
    (folder / "mine").mkdir()
    with pytest.raises(moec.PlanError, match=r"also holds mine, model\.onnx, which writing the plan again would delete"):
        compiled[0].save(folder)
    assert (folder / "model.onnx").read_bytes() == b"exported" and moec.load(folder).ir == compiled[0].ir


@pytest.mark.parametrize("plan_json", ['{"terraform_version": "1.6"}', '{"format": "moec-plan", "fil'],
                         ids=["another tool's", "truncated"])
def test_a_folder_whose_plan_json_is_not_a_moec_plan_keeps_what_moec_did_not_write(compiled, tmp_path, plan_json):
    (tmp_path / PLAN_FILE).write_text(plan_json)
    (tmp_path / "important.txt").write_text("mine")
    with pytest.raises(moec.PlanError, match=r"also holds important\.txt, which writing the plan again would delete"):
        compiled[0].save(tmp_path)
    assert (tmp_path / "important.txt").read_text() == "mine"
    (tmp_path / "important.txt").unlink()
    (tmp_path / WEIGHTS_FILE).write_bytes(b"damaged")  # a damaged plan of moec's own files is replaced
    assert moec.load(compiled[0].save(tmp_path)).ir == compiled[0].ir


@pytest.mark.parametrize(("payload", "type_name"), [
    ("plan/payload.py", "plan.payload.Out"),  # a module the plan carries, with the plan's parent on sys.path
    # unittest is imported (torch imports it), and importing unittest.__main__ runs unittest.main(), which
    # imports the test*.py files of the current folder
    ("test_payload.py", "unittest.__main__.Out"),
])
def test_a_type_named_in_a_plans_spec_never_runs_code(compiled, tmp_path, monkeypatch, payload, type_name):
    """A tampered out_spec: loading refuses the spec without importing what would run the payload."""
    folder = compiled[0].save(tmp_path / "plan")
    marker = tmp_path / "ran"
    (tmp_path / payload).write_text(f"open({str(marker)!r}, 'w').close()\nclass Out: pass\n")
    plan = json.loads((folder / PLAN_FILE).read_text())
    plan["out_spec"] = json.dumps([1, {"type": type_name, "context": "null", "children_spec": []}])
    (folder / PLAN_FILE).write_text(json.dumps(plan))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert "unittest" in sys.modules
    with pytest.raises(moec.PlanError, match="its out_spec cannot be read"):
        moec.load(folder, backend="torch")
    assert not marker.exists()


def test_a_plan_written_before_plan_json_listed_its_report_is_replaced(compiled, tmp_path):
    folder = compiled[0].save(tmp_path / "plan")
    plan = json.loads((folder / PLAN_FILE).read_text())
    del plan["documents"]
    (folder / PLAN_FILE).write_text(json.dumps(plan))
    compiled[0].save(folder)
    assert json.loads((folder / PLAN_FILE).read_text())["documents"] == [REPORT_FILE]


def test_loading_a_file_asks_for_the_plan_folder(compiled, tmp_path):
    folder = compiled[0].save(tmp_path / "plan")
    with pytest.raises(moec.PlanError, match=r"plan\.json is a file; give the plan folder \(the one holding plan\.json\)"):
        moec.load(folder / PLAN_FILE)


def test_flipped_byte_names_the_checksum(compiled, tmp_path):
    folder = compiled[0].save(tmp_path / "plan")
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(moec.PlanError, match=f"sha256 checksum mismatch for {WEIGHTS_FILE}"):
        moec.load(folder)


def test_missing_file_and_newer_version(compiled, tmp_path):
    folder = compiled[0].save(tmp_path / "plan")
    plan = json.loads((folder / PLAN_FILE).read_text())
    for newer in (plan_module.FORMAT_VERSION + 1, 99):
        plan["format_version"] = newer
        (folder / PLAN_FILE).write_text(json.dumps(plan))
        with pytest.raises(moec.PlanError, match=f"format version {newer}, newer than this moec reads"):
            moec.load(folder)
    (folder / WEIGHTS_FILE).unlink()
    plan["format_version"] = 1
    (folder / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(moec.PlanError, match=f"{WEIGHTS_FILE} is missing"):
        moec.load(folder)
    with pytest.raises(moec.PlanError, match="plan.json is missing"):
        moec.load(tmp_path / "nowhere")


def test_an_output_path_that_is_or_lies_under_a_file_is_one_error(compiled, tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(moec.PlanError, match="afile is a file, not a folder"):
        compiled[0].save(tmp_path / "afile")
    with pytest.raises(moec.PlanError, match=r"cannot write a plan at .*/sub/plan: .*afile is a file"):
        compiled[0].save(tmp_path / "afile" / "sub" / "plan")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize(("damage", "message"), [
    (lambda plan: [plan], "holds a JSON list, not a plan"),
    (lambda plan: {k: v for k, v in plan.items() if k != "ir"}, "its 'ir' entry is missing, expected a str"),
    (lambda plan: {**plan, "metadata": None}, "its 'metadata' entry is a JSON NoneType, expected a dict"),
    (lambda plan: {k: v for k, v in plan.items() if k != "files"}, "its 'files' entry is missing"),
    (lambda plan: {**plan, "files": {}}, f"lists no checksum for {WEIGHTS_FILE}"),
    (lambda plan: {**plan, "in_spec": "[1, 2"}, "its in_spec cannot be read"),
    (lambda plan: {**plan, "ir": plan["ir"].rstrip().removesuffix("}") + "\n"}, r"its IR does not load \(line \d+"),
    (lambda plan: {**plan, "ir": plan["ir"].replace("top_k=2", 'top_k="2"', 1)}, "its IR does not load"),
    (lambda plan: {**plan, "files": {**plan["files"], "a\x00b": "0" * 64}}, "cannot be read|outside the plan folder"),
])
def test_a_damaged_plan_json_is_one_plan_error(compiled, tmp_path, damage, message):
    folder = compiled[0].save(tmp_path / "plan")
    (folder / PLAN_FILE).write_text(json.dumps(damage(json.loads((folder / PLAN_FILE).read_text()))))
    with pytest.raises(moec.PlanError, match=message):
        moec.load(folder)


def test_plan_json_that_is_not_utf8_is_one_plan_error(compiled, tmp_path):
    folder = compiled[0].save(tmp_path / "plan")
    (folder / PLAN_FILE).write_bytes(b'{"format": "moec-plan\xff"}')
    with pytest.raises(moec.PlanError, match="is not valid JSON"):
        moec.load(folder)


@pytest.mark.parametrize(("change", "stored"), [
    (lambda tensor: tensor[:, :3].contiguous(), r"float32 \[\d+, 3\]"),
    (lambda tensor: tensor.half(), r"float16 \[\d+, \d+\]"),
], ids=["shape", "dtype"])
def test_a_stored_weight_of_another_type_than_declared_is_refused_at_load(compiled, tmp_path, change, stored):
    """The checksum matches (the file was written so): the declared types are what the graph was verified on."""
    import safetensors.torch

    folder = compiled[0].save(tmp_path / "plan")
    weights = safetensors.torch.load_file(str(folder / WEIGHTS_FILE))
    name = next(name for name, tensor in weights.items() if tensor.dim() == 2)
    weights[name] = change(weights[name])
    safetensors.torch.save_file(weights, str(folder / WEIGHTS_FILE))
    plan = json.loads((folder / PLAN_FILE).read_text())
    plan["files"][WEIGHTS_FILE] = plan_module.sha256_of(folder / WEIGHTS_FILE)
    (folder / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(moec.PlanError, match=rf"weight @{re.escape(name)} is declared f32\[.*but {WEIGHTS_FILE} "
                                             rf"stores it as {stored}; the plan is corrupt"):
        moec.load(folder)


def test_calibration_files_the_plan_does_not_list_are_not_read(compiled, tmp_path, preset):
    model, example = preset("tiny-mixtral")
    with_calibration = moec.compile(model, example, recipe={"passes": [{"expert-prune": {"keep": 3}}]},
                                    calibration=[example]).save(tmp_path / "calibrated")
    folder = compiled[0].save(tmp_path / "plan")
    for name in ("calibration.json", "calibration.safetensors"):
        (folder / name).write_bytes((with_calibration / name).read_bytes())
    assert moec.load(with_calibration).calibration is not None
    assert moec.load(folder).calibration is None


@pytest.mark.parametrize("version", ["1", 1.0, True, 0, None])
def test_a_format_version_that_is_not_a_positive_integer_is_named(compiled, tmp_path, version):
    folder = compiled[0].save(tmp_path / "plan")
    plan = json.loads((folder / PLAN_FILE).read_text())
    (folder / PLAN_FILE).write_text(json.dumps({**plan, "format_version": version}))
    with pytest.raises(moec.PlanError, match=rf"its 'format_version' entry is {re.escape(json.dumps(version))}, "
                                             "expected a positive integer"):
        moec.load(folder)


@pytest.mark.parametrize("entry", ["../outside.txt", "{tmp}/outside.txt", "inside_link.txt"])
def test_a_files_entry_outside_the_plan_folder_is_refused_unread(compiled, tmp_path, monkeypatch, entry):
    folder = compiled[0].save(tmp_path / "plan")
    outside = tmp_path / "outside.txt"
    outside.write_text("not the plan's")
    (folder / "inside_link.txt").symlink_to(outside)
    name = entry.format(tmp=tmp_path)
    plan = json.loads((folder / PLAN_FILE).read_text())
    plan["files"][name] = plan_module.sha256_of(outside)  # the right checksum: only the path gives it away
    (folder / PLAN_FILE).write_text(json.dumps(plan))
    read, sha256_of = [], plan_module.sha256_of
    monkeypatch.setattr(plan_module, "sha256_of", lambda path: read.append(path) or sha256_of(path))
    with pytest.raises(moec.PlanError, match=rf"its 'files' entry names {re.escape(repr(name))}, which is outside "
                                             "the plan folder"):
        moec.load(folder)
    assert read == []  # not even the plan's own files: the entry is refused first


def test_a_plan_saved_again_while_it_loads_is_refused_not_mixed(compiled, tmp_path, monkeypatch):
    """Another process saves to the folder after its plan.json was read and checked and before its weights
    are: the load says so instead of pairing one plan's IR with the other's weights."""
    model, _ = compiled
    folder = model.save(tmp_path / "plan")
    load_file = plan_module.safetensors.torch.load_file

    def saved_again_meanwhile(path):
        monkeypatch.setattr(plan_module.safetensors.torch, "load_file", load_file)
        model.save(folder)
        return load_file(path)

    monkeypatch.setattr(plan_module.safetensors.torch, "load_file", saved_again_meanwhile)
    with pytest.raises(moec.PlanError, match=r"was written again while it was being loaded \(another process saved "
                                             r"a plan to it\), so what was read may mix two plans; load it again"):
        moec.load(folder)
    assert moec.load(folder).ir == model.ir  # once the save has finished


def test_a_save_interrupted_between_its_renames_leaves_the_previous_plan_in_place(compiled, tmp_path, monkeypatch):
    model, _ = compiled
    folder = model.save(tmp_path / "plan")
    before = (folder / PLAN_FILE).read_text()
    rename = Path.rename

    def interrupted_once_the_old_plan_is_set_aside(self, target):
        if Path(target) == folder and self.name.startswith(".plan.") and self.name != ".plan.old":
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_once_the_old_plan_is_set_aside)
    with pytest.raises(KeyboardInterrupt):
        model.save(folder)
    monkeypatch.undo()
    assert (folder / PLAN_FILE).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]  # no staging folder, no set-aside plan


def test_a_full_disk_while_writing_the_weights_is_one_error(compiled, tmp_path, monkeypatch):
    model, _ = compiled

    def no_space(tensors, filename):
        raise plan_module.safetensors.SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(plan_module.safetensors.torch, "save_file", no_space)
    with pytest.raises(moec.PlanError, match=rf"^cannot write the plan at {re.escape(str(tmp_path / 'plan'))}: Error "
                                             r"while serializing: .*No space left on device.*; nothing was written$"):
        model.save(tmp_path / "plan")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("key", "value", "kind"), [
    ("report", ["triton"], "JSON object"),
    ("input_guards", "L['input_ids'].size()[1] <= 64", "list"),  # a string would leave every guard unchecked
    ("forward_parameters", 5, "list"),
    ("backend", ["torch"], "string"),
])
def test_a_metadata_entry_of_the_wrong_type_is_named(compiled, tmp_path, key, value, kind):
    folder = compiled[0].save(tmp_path / "plan")
    plan = json.loads((folder / PLAN_FILE).read_text())
    plan["metadata"][key] = value
    (folder / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(moec.PlanError, match=rf"its metadata entry '{key}' is a JSON \w+, expected a {kind}; the plan "
                                             "is corrupt"):
        moec.load(folder)


def test_an_entry_the_plan_does_not_read_may_change_while_it_loads(compiled, tmp_path, monkeypatch):
    """An export into the plan folder, or a person's notes there, is no second plan."""
    model, _ = compiled
    folder = model.save(tmp_path / "plan")
    load_file = plan_module.safetensors.torch.load_file

    def notes_written_meanwhile(path):
        (folder / "notes.txt").write_text("mine")
        return load_file(path)

    monkeypatch.setattr(plan_module.safetensors.torch, "load_file", notes_written_meanwhile)
    assert moec.load(folder).ir == model.ir
