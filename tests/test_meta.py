"""V-pretraining's meta step (designers.meta through designers.vision.hook): runs end to end,
the feedback never reaches the learner's gradient, the baseline is the plain learner, the
random control, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from designers.calibration import pearson_r
from designers.train import main
from designers.vision.config import VConfig
from designers.vision.hook import VisionDesignerHook
from dinov.checkpoint import latest_checkpoint, load_checkpoint
from dinov.config import load_config
from dinov.train.task import StepHook, Task
from dinov.train.trainer import Trainer

VSMOKE = "configs/vsmoke.yaml"
QUIET = ["probe.enabled=false", "train.plots=false", "train.progress=none"]


def vcfg(tmp_path, *overrides: str) -> VConfig:
    return load_config(VSMOKE, [f"output_dir={tmp_path}", *QUIET, *overrides],
                       schema=VConfig)


def params_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Capture(StepHook):
    """Records the (detached) task the designer hook returned and the learner's grads then."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.grads_none: list[bool] = []

    name = "capture"

    def before_step(self, ctx, images, task):
        self.tasks.append(task.detached())
        self.grads_none.append(all(p.grad is None for p in ctx.model.student.parameters()))
        return task


def first_batch(trainer: Trainer) -> torch.Tensor:
    return next(trainer.stream.iterate(0))


def default_and_designed(cfg: VConfig) -> tuple[VisionDesignerHook, dict[str, torch.Tensor], Task, Task]:
    """One step with a designer hook: the hook, its designer before the step, the default
    task built from the same RNG state and the designed task the learner got."""
    hook, capture = VisionDesignerHook(cfg), Capture()
    trainer = Trainer(cfg, hooks=[hook, capture])
    start = params_of(hook.designer)
    images = first_batch(trainer)
    torch.manual_seed(5)
    default = trainer.build_task(images)
    torch.manual_seed(5)
    trainer.train_step(images)
    return hook, start, default, capture.tasks[0]


def test_cli_run_changes_designer_and_fits_heads(tmp_path):
    cfg = vcfg(tmp_path / "a", "train.steps=4")
    hook = VisionDesignerHook(cfg)
    trainer = Trainer(cfg, hooks=[hook])
    before = params_of(hook.designer)
    trainer.fit()
    after = params_of(hook.designer)
    assert any(not torch.equal(before[k], after[k]) for k in before), "designer did not move"
    assert hook.core.meta_steps == 2  # steps 0 and 2 with every=2
    assert hook.heads.fit_steps == 2 * cfg.feedback.head_steps
    assert math.isfinite(hook.core.last_value)
    # the command line path, in process; 6 steps = 3 meta steps = a defined Pearson r
    out = tmp_path / "cli"
    results = main(["--config", VSMOKE, f"output_dir={out}", "train.steps=6", *QUIET])
    saved = json.loads((out / "results.json").read_text())
    assert saved["designer_meta_steps"] == 3.0
    assert math.isfinite(saved["calibration_r"]) and -1.0 <= saved["calibration_r"] <= 1.0
    assert results["calibration_r"] == saved["calibration_r"]


def test_feedback_never_reaches_the_learner_update(tmp_path):
    """THE INVARIANT: the V-step's learner update equals bitwise a plain learner step on the
    same detached designed views in a trainer that has no feedback data at all."""
    cfg = vcfg(tmp_path / "v", "train.steps=2")
    hook, capture = VisionDesignerHook(cfg), Capture()
    designed = Trainer(cfg, hooks=[hook, capture])
    images = first_batch(designed)
    designed.train_step(images)
    assert hook.core.meta_steps == 1  # step 0 was a meta step
    assert capture.grads_none == [True]  # the meta step left no .grad on the learner
    task = capture.tasks[0]

    plain_cfg = load_config("configs/smoke.yaml", [f"output_dir={tmp_path / 'p'}", *QUIET])
    plain = Trainer(plain_cfg)
    plain.learner_step(task, plain.schedules.at(0))
    a, b = params_of(designed.model), params_of(plain.model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_designed_views_are_not_the_default_views(tmp_path):
    _, _, default, designed = default_and_designed(vcfg(tmp_path, "train.steps=2"))
    assert not torch.equal(designed.student_global, default.student_global)
    assert torch.equal(designed.teacher_global, default.teacher_global)  # student views only
    assert torch.equal(designed.local, default.local)


def test_kind_none_is_the_plain_learner_bitwise(tmp_path):
    cfg = vcfg(tmp_path / "none", "designer.kind=none", "train.steps=3")
    hooked = Trainer(cfg, hooks=[VisionDesignerHook(cfg)])
    hooked.fit()
    plain = Trainer(load_config("configs/smoke.yaml",
                                [f"output_dir={tmp_path / 'plain'}", "train.steps=3", *QUIET]))
    plain.fit()
    a, b = params_of(hooked.model), params_of(plain.model)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _one_meta_step(tmp_path, mode: str) -> tuple[VisionDesignerHook, dict[str, torch.Tensor]]:
    cfg = vcfg(tmp_path / mode, f"feedback.mode={mode}", "train.steps=1")
    hook = VisionDesignerHook(cfg)
    trainer = Trainer(cfg, hooks=[hook])
    start = params_of(hook.designer)
    trainer.train_step(first_batch(trainer))
    return hook, start


def test_random_feedback_control_gives_a_different_designer_update(tmp_path):
    real, real_start = _one_meta_step(tmp_path, "real")
    rand, rand_start = _one_meta_step(tmp_path, "random")
    for key in real_start:  # same initial designer ...
        assert torch.equal(real_start[key], rand_start[key]), key
    assert real.core.meta_steps == rand.core.meta_steps == 1
    assert math.isfinite(rand.core.last_value) and rand.core.last_value != real.core.last_value
    real_end, rand_end = params_of(real.designer), params_of(rand.designer)
    # ... through the same code, a different update
    assert any(not torch.equal(real_end[k], rand_end[k]) for k in real_end)
    assert any(not torch.equal(rand_end[k], rand_start[k]) for k in rand_end)


def test_resume_restores_the_hook_state_bitwise(tmp_path):
    common = ["train.steps=4", "train.checkpoint_every=2", "train.log_every=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Trainer(vcfg(straight, *common), hooks=[VisionDesignerHook(vcfg(straight, *common))]).fit()
    stop = vcfg(resumed, *common, "train.stop_at_step=2")
    Trainer(stop, hooks=[VisionDesignerHook(stop)]).fit()
    again = vcfg(resumed, *common, "train.resume=true")
    hook = VisionDesignerHook(again)
    Trainer(again, hooks=[hook]).fit()
    a = load_checkpoint(latest_checkpoint(straight / "checkpoints"))["hooks"]["designer"]
    b = load_checkpoint(latest_checkpoint(resumed / "checkpoints"))["hooks"]["designer"]
    assert a["core"]["meta_steps"] == b["core"]["meta_steps"] == 2
    assert a["core"]["calibration"] == b["core"]["calibration"]
    for part, c, d in (("designer", a["core"]["designer"], b["core"]["designer"]),
                       ("heads", a["heads"], b["heads"])):
        for key, value in c.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, d[key]), (part, key)
    optimizer_a, optimizer_b = a["core"]["optimizer"], b["core"]["optimizer"]
    for pid, state in optimizer_a["state"].items():
        assert torch.equal(state["exp_avg"], optimizer_b["state"][pid]["exp_avg"])
    # a direct round trip: a hook built by the trainer (setup) takes the saved state
    fresh = VisionDesignerHook(again)
    Trainer(again, hooks=[fresh])
    fresh.load_state_dict(hook.state_dict())
    for key, value in params_of(hook.designer).items():
        assert torch.equal(value, params_of(fresh.designer)[key]), key
    assert fresh.core.calibration.predicted == hook.core.calibration.predicted
    assert fresh.core.meta_steps == hook.core.meta_steps


def test_pearson_r():
    assert math.isnan(pearson_r([1.0, 2.0], [1.0, 2.0]))
    assert abs(pearson_r([1.0, 2.0, 3.0], [2.0, 4.0, 6.5]) - 0.9986) < 1e-3
    assert abs(pearson_r([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) + 1.0) < 1e-12


@pytest.mark.parametrize("overrides", [
    ("designer.kind=augment",),
    ("designer.kind=token_mask",),
    ("value.method=jvp",),
    ("value.method=exact", "designer.mask.apply_to_teacher=true"),
    ("value.batch_size=3", "value.recompute=true"),
    ("designer.kind=augment", "designer.teacher_gradient=true"),
    ("designer.kind=augment", "designer.teacher_gradient=true", "value.recompute=true"),
    ("designer.mask.apply_to_teacher=true", "designer.teacher_gradient=true", "value.batch_size=3"),
])
def test_other_designers_and_estimators_take_a_meta_step(tmp_path, overrides):
    cfg = vcfg(tmp_path, "train.steps=1", *overrides)
    hook, capture = VisionDesignerHook(cfg), Capture()
    trainer = Trainer(cfg, hooks=[hook, capture])
    start = params_of(hook.designer)
    assert trainer.train_step(first_batch(trainer)) is not None
    assert hook.core.meta_steps == 1 and math.isfinite(hook.core.last_value)
    assert capture.grads_none == [True]
    end = params_of(hook.designer)
    assert any(not torch.equal(start[k], end[k]) for k in start)
    task = capture.tasks[0]
    size = cfg.crops.global_crops_size
    assert task.student_global.shape == (task.n_global * task.batch_size, 3, size, size)
    if cfg.designer.mask.apply_to_teacher:
        # the teacher sees the same designed views (the default task gives both the same input)
        assert torch.equal(task.teacher_global, task.student_global)
    if cfg.designer.kind == "token_mask":  # designed positions, the default's count per crop
        torch.manual_seed(cfg.train.seed)
        default = Trainer(cfg).build_task(first_batch(trainer))
        assert task.soft_masks is None  # the learner gets hard masks
        assert torch.equal(task.masks.masks.sum(1), default.masks.masks.sum(1))
        assert not torch.equal(task.masks.masks, default.masks.masks)


@pytest.mark.parametrize("augment_local", [True, False])
def test_augmentation_designer_designs_local_crops(tmp_path, augment_local):
    cfg = vcfg(tmp_path, "train.steps=1", "designer.kind=augment",
               f"designer.augment.local={str(augment_local).lower()}")
    hook, _, default, task = default_and_designed(cfg)
    assert task.local.shape == default.local.shape
    assert torch.equal(task.local, default.local) is not augment_local
    assert ("local" in hook.designer) is augment_local
    if augment_local:  # the local designer was updated by the meta step as well
        assert hook.designer["local"].head.weight.grad is None  # grads cleared after the step
        assert float(hook.core.optimizer.state[hook.designer["local"].head.weight]["step"]) == 1.0


def test_fixed_designer_control(tmp_path):
    """designer.fixed: the initial designer shapes the views, no meta step, no feedback."""
    hook, start, default, designed = default_and_designed(
        vcfg(tmp_path, "train.steps=3", "designer.fixed=true"))
    assert hook.pools is None and hook.heads is None and hook.core.meta_steps == 0
    assert not torch.equal(designed.student_global, default.student_global)
    for key, value in params_of(hook.designer).items():
        assert torch.equal(value, start[key]), key
    assert set(hook.state_dict()) == {"core"} and set(hook.state_dict()["core"]) == {"designer"}


def test_task_rows_and_concat(tmp_path):
    """value.batch_size=n evaluates V on the first n images: the subset task's loss is the
    loss of a task built from those images alone (iBOT weights renormalised)."""
    cfg = vcfg(tmp_path, "train.steps=1")
    trainer = Trainer(cfg)
    torch.manual_seed(0)
    task = trainer.build_task(first_batch(trainer))
    sub = task.rows(0, 3)
    assert sub.batch_size == 3 and sub.n_global == task.n_global
    views = task.student_global.unflatten(0, (task.n_global, -1))
    assert torch.equal(sub.student_global, views[:, :3].flatten(0, 1))
    masks = task.masks.masks.unflatten(0, (task.n_global, -1))[:, :3].flatten(0, 1)
    assert torch.equal(sub.masks.masks, masks)
    # DINOv2's weighting: each masked crop sums to 1 / (all crops of the subset)
    expected = masks.any(1).sum() / masks.shape[0]
    assert torch.allclose(sub.masks.weights.sum(), expected.float())
    assert task.rows(0, task.batch_size) is task
    with pytest.raises(ValueError, match="rows must satisfy"):
        task.rows(0, 0)
    joined = Task.concat(sub, task.rows(3, task.batch_size))
    for name in ("student_global", "teacher_global", "local"):
        assert torch.equal(getattr(joined, name), getattr(task, name)), name
    for name in ("masks", "indices", "weights"):
        assert torch.equal(getattr(joined.masks, name), getattr(task.masks, name)), name
    model = trainer.model
    targets = model.teacher_targets(sub, 0.04)
    assert torch.isfinite(model.student_losses(sub, targets)["total"])


def test_float_masks_equal_bool_masks_bitwise(tmp_path):
    trainer = Trainer(vcfg(tmp_path, "train.steps=1"))
    torch.manual_seed(0)
    task = trainer.build_task(first_batch(trainer))
    backbone = trainer.model.backbone
    hard = backbone(task.student_global, task.masks.masks)
    soft = backbone(task.student_global, task.masks.masks.float())
    assert torch.equal(hard.patch, soft.patch) and torch.equal(hard.cls, soft.cls)


def test_bad_designer_kind_is_a_clean_cli_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", VSMOKE, "designer.kind=bogus"])
    assert exit_info.value.code == 2
    assert "designer.kind" in capsys.readouterr().err
