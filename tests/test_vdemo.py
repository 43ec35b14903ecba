"""The V-pretraining demo's machinery end to end with tiny step counts and eval budgets."""

from __future__ import annotations

import math
import pathlib

from designers.demo import ARMS, DemoSettings, run_demo


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
    for name in ("designs.png", "calibration.png", "metrics.png", "curves.png"):
        assert (settings.out / name).stat().st_size > 0
    assert (settings.out / "results.json").is_file()
