"""Config merging and its error messages (schema <- YAML <- CLI)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from omegaconf import MISSING

from dinov.config import Config, ConfigError, load_config, to_yaml


def test_precedence_schema_yaml_cli(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("optim:\n  lr: 0.5\n  min_lr: 0.25\ntrain:\n  steps: 7\n")
    cfg = load_config(yaml, ["optim.lr=0.125", "crops.global_crops_scale=[0.4,1.0]"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == 0.125  # CLI beats YAML
    assert cfg.optim.min_lr == 0.25  # YAML beats schema
    assert cfg.train.steps == 7
    assert cfg.crops.global_crops_scale == [0.4, 1.0]
    assert cfg.optim.weight_decay == 0.04  # schema default


def test_unknown_key_names_key_and_file(tmp_path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("optim:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'optim\.lrr'"):
        load_config(yaml)
    with pytest.raises(ConfigError, match=r"command line.*'optim\.lr_typo'"):
        load_config(None, ["optim.lr_typo=1"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'train\.steps' expects int"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"'optim\.lr' expects float"):
        load_config(None, ["optim.lr=fast"])


def test_choice_validation_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"'loss\.centering' must be one of"):
        load_config(None, ["loss.centering=sinkhorn"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=0.002", "model.depth=3"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(path)
    assert again == cfg


@pytest.mark.parametrize(
    ("override", "expected"),
    [("optim.lr_typo=1", "optim.lr_typo"), ("train.steps=abc", "train.steps' expects int")],
)
def test_cli_exits_nonzero_naming_key(override, expected):
    proc = subprocess.run(
        [sys.executable, "-m", "dinov.train", "--config", "configs/smoke.yaml", override],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert proc.stderr.count("\n") <= 2, proc.stderr  # one message, no traceback


@dataclass
class _RequiredData:
    root: str = MISSING


@dataclass
class _RequiredSchema:
    data: _RequiredData = field(default_factory=_RequiredData)


def test_missing_mandatory_value_is_a_config_error():
    Schema = _RequiredSchema
    with pytest.raises(ConfigError, match=r"'data\.root' is required"):
        load_config(None, [], schema=Schema)
    assert load_config(None, ["data.root=/x"], schema=Schema).data.root == "/x"


def test_base_chain_overrides_and_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("optim:\n  lr: 0.5\ntrain:\n  steps: 7\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  steps: 9\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.yaml").write_text("base: ../b.yaml\noutput_dir: x\n")
    cfg = load_config(sub / "c.yaml", ["train.seed=3"])
    assert (cfg.optim.lr, cfg.train.steps, cfg.output_dir, cfg.train.seed) == (0.5, 9, "x", 3)
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "d.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml \(base of .*d\.yaml\)"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("base: a.yaml\ntrain:\n  stepz: 1\n")
    with pytest.raises(ConfigError, match="e.yaml.*train.stepz"):
        load_config(tmp_path / "e.yaml")
