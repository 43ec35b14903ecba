"""A designer defined in this file alone (no edit under designers/) runs meta steps through
the same trainer, hook and meta core that ``python -m designers.train`` uses."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import designers.registry as registry
from designers.registry import Design, register_designer
from designers.train import main
from designers.vision import VISION
from dinov.config import ConfigError
from dinov.train.task import Task

VSMOKE = "configs/vsmoke.yaml"
QUIET = ["probe.enabled=false", "train.plots=false", "train.progress=none"]


@dataclass
class BrightnessConfig:
    """``designer.brightness.*``: how strongly the scale is pulled toward 1."""

    lambda_l2: float = 0.1


class BrightnessDesigner(nn.Module):
    """Scales each image's global views by ``1 + tanh(w · mean colour + b)``."""

    def __init__(self, cfg: BrightnessConfig, **learner: object) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = nn.Linear(3, 1)

    def design(self, inputs: Tensor, task: Task) -> Design:
        scale = 1 + torch.tanh(self.net(task.student_global.mean(dim=(2, 3))))  # (views, 1)
        views = task.student_global * scale[:, :, None, None]
        return Design(dataclasses.replace(task, student_global=views), scale)

    def regulariser(self, design: Design) -> Tensor:
        return self.cfg.lambda_l2 * (design.outputs - 1).square().mean()


@pytest.fixture
def brightness(monkeypatch):
    """Registered for this test only (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_designer("brightness", VISION, BrightnessConfig)(BrightnessDesigner)


def test_a_designer_registered_outside_designers_takes_meta_steps(tmp_path, brightness, capsys):
    out = tmp_path / "run"
    results = main(["--config", VSMOKE, f"output_dir={out}", *QUIET, "train.steps=6",
                    "designer.kind=brightness", "designer.brightness.lambda_l2=0.3"])
    assert results["designer_meta_steps"] == 3.0  # steps 0, 2, 4 (every 2)
    assert math.isfinite(results["calibration_r"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    meta_rows = [r for r in rows if "designer/V" in r]
    assert [r["step"] for r in meta_rows] == [1, 3, 5]
    assert all("designer/predicted_delta" in r and "designer/realised_delta" in r for r in meta_rows)
    assert "lambda_l2: 0.3" in (out / "config.yaml").read_text()  # its own section, resolved
    from dinov.checkpoint import latest_checkpoint, load_checkpoint

    state = load_checkpoint(latest_checkpoint(out / "checkpoints"))["hooks"]["designer"]["core"]
    assert set(state["designer"]) == {"net.weight", "net.bias"}
    assert not torch.equal(state["designer"]["net.bias"], torch.zeros(1))  # it learned


def test_its_section_is_typed_like_the_built_in_ones(tmp_path, brightness, capsys):
    from designers.vision.config import load_vconfig

    with pytest.raises(ConfigError, match="designer.brightness.lambda_l3"):
        load_vconfig(VSMOKE, ["designer.brightness.lambda_l3=1"])
    with pytest.raises(ConfigError, match="designer.brightness.lambda_l2"):
        load_vconfig(VSMOKE, ["designer.brightness.lambda_l2=strong"])
    assert load_vconfig(VSMOKE, ["designer.kind=brightness"]).designer.brightness.lambda_l2 == 0.1


def test_unknown_designer_kind_names_the_registered_ones(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--config", VSMOKE, "designer.kind=brightness"])  # not registered here
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "designer.kind" in err and "'augment'" in err and "'token_mask'" in err
