"""A path that starts with ``~`` names a file or folder in the user's home, not a folder named ``~``."""

from __future__ import annotations

import torch
from torch import nn

import moec


def test_save_load_export_and_recipe_paths_expand_the_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # where a folder literally named ~ would appear
    (home / "recipe.yaml").write_text("passes: []\n")
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(2, 3, 4)
    compiled = moec.compile(model, (x,), recipe="~/recipe.yaml")
    assert compiled.save("~/plan") == (home / "plan").resolve()
    torch.testing.assert_close(moec.load("~/plan")(x), compiled(x))
    assert compiled.export_onnx("~/model.onnx") == (home / "model.onnx").resolve()
    assert not (tmp_path / "~").exists()
