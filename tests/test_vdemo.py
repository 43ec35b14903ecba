"""The V-pretraining demo's machinery end to end with tiny step counts and eval budgets."""

from __future__ import annotations

import math
import pathlib

from demo.vpretrain import ARMS, DemoSettings, run_demo


def test_vdemo_tiny(tmp_path: pathlib.Path) -> None:
    tiny_data = ["data.num_samples=32", "data.batch_size=8"]
    settings = DemoSettings(
        steps=4,
        out=tmp_path / "vdemo",
        pretrain_dir=tmp_path / "demo",
        pretrain_steps=3,
        pretrain_overrides=[*tiny_data, "probe.enabled=false", "train.plots=false",
                            "train.progress=none"],
        arm_overrides=[*tiny_data, "designer.every=1", "feedback.synthetic_head_pool=16",
                       "feedback.synthetic_meta_pool=8", "feedback.head_steps=1",
                       "feedback.head_batch_size=8", "feedback.meta_batch_size=4"],
        eval_images=40,
        eval_iterations=3,
        eval_warmup=1,
        linear_epochs=2,
    )
    results = run_demo(settings)
    arms = results["arms"]
    assert list(arms) == list(ARMS) and len(arms) == 4
    for arm, row in arms.items():
        for key in ("seg_miou", "depth_rmse", "linear_top1", "arm_seconds", "eval_seconds"):
            assert math.isfinite(row[key]), (arm, key, row[key])
        if ARMS[arm][0] != "none":  # the baseline has no designer, so no calibration r
            assert math.isfinite(row["calibration_r"]), arm
    assert len(results["table"].splitlines()) == 2 + 4
    for name in ("designs.png", "calibration.png", "gains.png", "curves.png"):
        assert (settings.out / name).stat().st_size > 0
    assert (settings.out / "results.json").is_file()
    designers = results["designers"]
    assert set(designers) == {"mask", "augment", "random"}
    assert 0.0 <= designers["mask"]["mu_objects"] <= 1.0
    # the untrained designer reproduces DINO's default grayscale probability
    assert abs(designers["augment"]["grayscale_default"] - 0.2) < 0.05
    # a second run reuses the cached pretraining (same config) instead of retraining it
    before = (settings.pretrain_dir / "metrics.jsonl").stat().st_mtime_ns
    settings.steps, settings.plots = 1, False
    run_demo(settings)
    assert (settings.pretrain_dir / "metrics.jsonl").stat().st_mtime_ns == before


def test_synthetic_gain_summary() -> None:
    """benchmarks/synthetic_gain.py: mean/std per arm and per-seed gains, hand-computed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("synthetic_gain", "benchmarks/synthetic_gain.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(seg: list[float], rmse: list[float]) -> dict:
        arms = {arm: {"seg_miou": seg[i], "depth_rmse": rmse[i], "linear_top1": 80.0,
                      "calibration_r": math.nan if arm == "baseline" else 0.5}
                for i, arm in enumerate(ARMS)}
        return {"arms": arms, "designers": {"augment": {"grayscale": 0.1}}}

    out = module.summarise([run([50, 52, 53, 50], [1.2, 1.1, 1.15, 1.2]),
                            run([51, 52, 55, 51], [1.3, 1.2, 1.2, 1.3])])
    assert out["arms"]["mask"]["seg_miou"]["mean"] == 52.0
    assert out["arms"]["mask"]["seg_miou"]["std"] == 0.0
    assert out["arms"]["augment"]["seg_miou"]["std"] == round(math.sqrt(2.0), 4)
    assert math.isnan(out["arms"]["baseline"]["calibration_r"]["mean"])
    assert out["gain_over_baseline"]["augment"]["seg_miou"]["values"] == [3.0, 4.0]
    assert out["gain_over_baseline"]["augment"]["depth_rmse"]["values"] == [0.05, 0.1]
    assert out["designers"]["augment"]["grayscale"] == 0.1

