"""Loading local checkpoint files into a :class:`~dinov.models.backbone.Backbone`.

This module owns checkpoint *formats*: finding the backbone's tensors inside a file,
converting their names/layouts to timm's, and loading them strictly. Formats:

``dinov2``
    facebookresearch/dinov2 layout (``dinov2_vits14_pretrain.pth``): ``cls_token``,
    ``pos_embed`` (1, 1 + 37*37, D), ``register_tokens`` (reg models), ``mask_token``,
    ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``,
    ``norm``. Also dinov2 training checkpoints (``{"model": {"teacher.backbone.*",
    "student.backbone.*", ...}}``), eval ``teacher_checkpoint.pth`` files
    (``{"teacher": {"backbone.*", ...}}``) and FSDP "chunked blocks"
    (``blocks.<chunk>.<N>.*``).
``dinov3``
    facebookresearch/dinov3 layout: ``cls_token``, ``storage_tokens``, ``mask_token``,
    ``rope_embed.periods``, ``blocks.N.{...,ls1.gamma,...}``, ``attn.qkv.bias_mask``.
``timm``
    a timm state dict of the same architecture.
``ours``
    a checkpoint of this trainer: ``{"model": {"teacher.backbone.model.*", ...}}``
    (or a bare ``Backbone.state_dict()``).

Conversion is delegated to timm's own ``checkpoint_filter_fn`` of each family (which
also resamples position embeddings and patch kernels to the model's grid); this module
adds what those converters drop or assume: the iBOT ``mask_token`` is kept (loaded into
``Backbone.mask_token``), DINOv3 rope periods are checked and loaded (timm skips them),
and loading is strict: any missing, unexpected or mis-shaped key is an error naming
the file.

Position tables are never resampled at load: the backbone takes the file's grid (37x37
for official DINOv2 files, whatever a timm or our file holds) and resizes per input
(:meth:`~dinov.models.backbone.Backbone.position_embedding`) with the interpolation of
the weights' family. ``pos_interp="auto"`` settles that family here: ``dinov2`` or
``dinov2_reg`` (official files without / with registers), the value our checkpoints
record as ``pos_interp`` (``timm`` for older ones, whose tables were resampled with
timm's interpolation), ``timm`` otherwise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dinov.checkpoint import load_tensor_file
from dinov.models.backbone import POS_INTERPOLATIONS, Backbone

FORMATS = ("auto", "dinov2", "dinov3", "timm", "ours")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
# Parts of official DINOv3 files that only the pretraining code uses.
_DINOV3_TRAINING_ONLY = re.compile(r"(\.bias_mask$|^local_cls_norm\.|^projectors\.)")


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did with a file."""

    path: str
    format: str  # the resolved format (never "auto")
    prefix: str  # key prefix the backbone lived under in the file ("" for none)
    loaded: list[str] = field(default_factory=list)  # Backbone state keys set from the file
    ignored: list[str] = field(default_factory=list)  # file keys deliberately not loaded
    converted: list[str] = field(default_factory=list)  # renames, resamples, other conversions
    mask_token_loaded: bool = False  # False: the file had none; Backbone.mask_token untouched
    pos_grid: tuple[int, int] | None = None  # the file's position table grid (None: RoPE)
    pos_interp: str = "timm"  # how that table is resized to other input grids

    def summary(self) -> str:
        positions = (
            f"positions {self.pos_grid[0]}x{self.pos_grid[1]}, {self.pos_interp} interpolation; "
            if self.pos_grid else ""
        )
        return (
            f"loaded {len(self.loaded)} tensors from {self.path} (format={self.format}, "
            f"prefix={self.prefix!r}); ignored {len(self.ignored)}; "
            f"mask_token {'loaded' if self.mask_token_loaded else 'kept'}; {positions}"
            + ("; ".join(self.converted) or "no conversions")
        )


def load_backbone_weights(
    backbone: Backbone,
    path: str | Path,
    fmt: str = "auto",
    key: str = "teacher",
    pos_interp: str = "auto",
) -> LoadReport:
    """Load the backbone weights in ``path`` (format ``fmt``) into ``backbone``, strictly.

    ``key`` picks ``teacher`` or ``student`` in training checkpoints that hold both.
    The backbone takes the file's position-table grid, and ``backbone.pos_interp``
    becomes ``pos_interp``, or with ``auto`` the file family's (module docstring).
    Raises FileNotFoundError for a missing file and ValueError (naming the file) when the
    keys or shapes do not match the backbone exactly.
    """
    if fmt not in FORMATS:
        raise ValueError(f"weights format must be one of {FORMATS}, got {fmt!r}")
    if key not in ("teacher", "student"):
        raise ValueError(f"weights key must be 'teacher' or 'student', got {key!r}")
    if pos_interp not in POS_INTERPOLATIONS:
        raise ValueError(f"pos_interp must be one of {POS_INTERPOLATIONS}, got {pos_interp!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    raw = load_tensor_file(path)
    state, prefix, ignored = _select_state(raw, key, path)
    state, unchunked = _unchunk_blocks(state)
    fmt = _detect_format(state) if fmt == "auto" else fmt
    report = LoadReport(path=str(path), format=fmt, prefix=prefix, ignored=ignored)
    if unchunked:
        report.converted.append("FSDP chunked blocks.<chunk>.<N> -> blocks.<N>")
    convert = {
        "dinov2": _from_dinov2,
        "dinov3": _from_dinov3,
        "timm": _from_timm,
        "ours": _from_ours,
    }
    report.pos_interp = _family_pos_interp(raw, state, fmt) if pos_interp == "auto" else pos_interp
    target = convert[fmt](backbone, state, report)
    _strict_load(backbone, target, report)
    backbone.pos_interp = report.pos_interp
    report.pos_grid = backbone.position_grid
    return report


# --------------------------------------------------------------------- reading
def _select_state(raw: object, key: str, path: Path) -> tuple[dict[str, Tensor], str, list[str]]:
    """Find the backbone's tensors: unwrap containers, pick teacher/student, strip the prefix."""
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(raw).__name__}")
    for container in ("model", key, "state_dict"):
        if isinstance(raw.get(container), dict):
            raw = raw[container]
            break
    state = {k: v for k, v in raw.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"{path}: no tensors found in the checkpoint")
    roles = {k.split(".", 1)[0] for k in state if re.match(r"^(teacher|student)\.backbone\.", k)}
    if roles and key not in roles:
        raise ValueError(f"{path}: no '{key}.backbone.*' keys; the file holds {sorted(roles)}")
    for prefix in (f"{key}.backbone.", "module.backbone.", "backbone.", "module."):
        if any(k.startswith(prefix) for k in state):
            kept = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            ignored = sorted(k for k in state if not k.startswith(prefix))
            return kept, prefix, ignored
    return state, "", []


def _unchunk_blocks(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """dinov2's FSDP block chunking stores block N as blocks.<chunk>.<N>: drop the chunk."""
    if not any(_CHUNKED_BLOCK.match(k) for k in state):
        return state, False
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state.items()}, True


def _detect_format(state: dict[str, Tensor]) -> str:
    if any(k.startswith("model.") for k in state):
        return "ours"
    if "storage_tokens" in state or "rope_embed.periods" in state:
        return "dinov3"
    if "mask_token" in state or "register_tokens" in state:
        return "dinov2"
    return "timm"


def _family_pos_interp(raw: object, state: dict[str, Tensor], fmt: str) -> str:
    """How the weights' own family resizes their position table (``pos_interp=auto``)."""
    if fmt == "dinov2":
        return "dinov2_reg" if "register_tokens" in state else "dinov2"
    recorded = raw.get("pos_interp") if fmt == "ours" and isinstance(raw, dict) else None
    if recorded in POS_INTERPOLATIONS and recorded != "auto":
        return str(recorded)  # what the training run resolved (Trainer.state_dict)
    return "timm"  # timm files, and our checkpoints from before pos_interp was recorded


def _keep_native_grid(backbone: Backbone, table: Tensor | None, file_prefix_rows: int,
                      report: LoadReport) -> None:
    """Make the backbone's position table the file's grid, so loading resamples nothing.

    ``file_prefix_rows`` counts the rows before the patch positions in the file's table
    (the cls row of official DINOv2 files; timm's layout for timm and our files).
    """
    if table is None or backbone.position_grid is None:
        return
    patches = table.shape[1] - file_prefix_rows
    side = math.isqrt(max(patches, 0))
    if side * side == patches:
        grid = (side, side)
    elif patches == math.prod(backbone.position_grid):  # non-square: only the built one fits
        grid = backbone.position_grid
    else:
        raise ValueError(
            f"{report.path}: pos_embed {tuple(table.shape)} holds {patches} patch positions: "
            f"not a square grid and not the model's {backbone.position_grid}"
        )
    backbone.set_position_grid(grid)


# ------------------------------------------------------------------ converting
def _require_family(backbone: Backbone, eva: bool, fmt: str) -> None:
    if backbone.is_eva != eva:
        want = "an Eva (*_dinov3)" if eva else "a VisionTransformer (*_dinov2)"
        raise ValueError(
            f"{fmt} weights need {want} architecture, but the backbone is "
            f"{type(backbone.model).__name__}"
        )


def _take_mask_token(state: dict[str, Tensor], report: LoadReport) -> Tensor | None:
    """Official mask tokens are (1, D); timm's converters discard them, we keep them."""
    mask = state.pop("mask_token", None)
    if mask is not None:
        report.mask_token_loaded = True
        return mask.reshape(1, -1)
    return None


def _note_resamples(
    before: dict[str, Tensor], after: dict[str, Tensor], report: LoadReport
) -> None:
    # Position tables are kept at the file's grid (_keep_native_grid): only patch kernels
    # of another patch size are resampled here.
    for name in ("patch_embed.proj.weight",):
        if name in before and name in after and before[name].shape != after[name].shape:
            report.converted.append(
                f"{name} resampled {tuple(before[name].shape)} -> {tuple(after[name].shape)}"
            )


def _from_dinov2(
    backbone: Backbone, state: dict[str, Tensor], report: LoadReport
) -> dict[str, Tensor]:
    from timm.models.vision_transformer import checkpoint_filter_fn

    _require_family(backbone, eva=False, fmt="dinov2")
    model = backbone.model
    state = dict(state)
    mask = _take_mask_token(state, report)
    if "register_tokens" in state:
        if not model.no_embed_class:
            raise ValueError(
                f"{report.path}: the file has register tokens; use a *_reg4_dinov2 arch "
                "(timm folds the cls position into cls_token for no_embed_class models)"
            )
        report.converted.append("register_tokens -> reg_token; cls_token += pos_embed[:, 0]")
    _keep_native_grid(backbone, state.get("pos_embed"), 1, report)  # official: one cls row
    # timm recognises the dinov2 layout by the presence of 'mask_token' (and then drops it).
    converted = checkpoint_filter_fn(dict(state, mask_token=torch.zeros(1)), model)
    _note_resamples(state, converted, report)
    return _with_mask(converted, mask)


def _drop_dinov3_extras(
    backbone: Backbone, state: dict[str, Tensor], report: LoadReport
) -> Tensor | None:
    """Check or drop what the DINOv3 file holds beyond the timm model's parameters; returns
    the file's rope periods (to load), or None when it has none."""
    for name in [k for k in state if _DINOV3_TRAINING_ONLY.search(k)]:
        report.ignored.append(name)
        del state[name]
    periods = state.pop("rope_embed.periods", None)
    if periods is not None:
        ours = _rope_periods(backbone)
        # Same base and head dim (timm recomputes the periods from the arch): a different
        # rope cannot load silently. The file's own values are then loaded, not timm's.
        if (
            ours is None
            or periods.shape != ours.shape
            or not torch.allclose(periods.float(), ours.float(), rtol=1e-2)
        ):
            raise ValueError(
                f"{report.path}: rope_embed.periods {periods.float().tolist()[:4]}... do not match "
                f"the architecture's RoPE periods "
                f"({None if ours is None else ours.tolist()[:4]}...): different rope base/head dim?"
            )
        report.converted.append("rope_embed.periods -> rope.periods (the file's values)")
    if getattr(backbone.model.blocks[0].attn, "q_bias", None) is None:
        for name in [k for k in state if k.endswith("attn.qkv.bias")]:
            if state[name].abs().max() > 0:
                raise ValueError(
                    f"{report.path}: {name} is non-zero but the architecture has no qkv bias; "
                    "use the *_qkvb variant of the arch"
                )
            report.ignored.append(name)  # all-zero (distilled models): nothing lost
            del state[name]
    return periods


def _rope_periods(backbone: Backbone) -> Tensor | None:
    """timm's DINOv3 RoPE periods buffer (made persistent by Backbone), or None."""
    periods = getattr(getattr(backbone.model, "rope", None), "periods", None)
    return periods if isinstance(periods, Tensor) else None


def _with_periods(converted: dict[str, Tensor], periods: Tensor | None) -> dict[str, Tensor]:
    # timm's Eva converter drops every rope key: put the file's periods back.
    if periods is not None:
        converted["rope.periods"] = periods.to(torch.float32)
    return converted


def _from_dinov3(
    backbone: Backbone, state: dict[str, Tensor], report: LoadReport
) -> dict[str, Tensor]:
    from timm.models.eva import checkpoint_filter_fn

    _require_family(backbone, eva=True, fmt="dinov3")
    state = dict(state)
    mask = _take_mask_token(state, report)
    periods = _drop_dinov3_extras(backbone, state, report)
    if "storage_tokens" not in state:
        # timm recognises the dinov3 layout by 'storage_tokens'; without them nothing is renamed.
        raise ValueError(f"{report.path}: dinov3 weights without storage_tokens are not supported")
    report.converted.append("storage_tokens -> reg_token; ls{1,2}.gamma -> gamma_{1,2}")
    if any(k.endswith("attn.qkv.bias") for k in state):
        report.converted.append("attn.qkv.bias -> q_bias, v_bias (k bias is fixed at 0)")
    converted = _with_periods(checkpoint_filter_fn(state, backbone.model), periods)
    _note_resamples(state, converted, report)
    return _with_mask(converted, mask)


def _from_timm(
    backbone: Backbone, state: dict[str, Tensor], report: LoadReport
) -> dict[str, Tensor]:
    if backbone.is_eva:
        from timm.models.eva import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
    state = dict(state)
    mask = _take_mask_token(state, report)
    _keep_native_grid(backbone, state.get("pos_embed"), backbone.pos_prefix_rows, report)
    converted = checkpoint_filter_fn(state, backbone.model)
    if backbone.is_eva:
        converted = _with_periods(converted, state.get("rope.periods"))
    _note_resamples(state, converted, report)
    return _with_mask(converted, mask)


def _from_ours(
    backbone: Backbone, state: dict[str, Tensor], report: LoadReport
) -> dict[str, Tensor]:
    report.mask_token_loaded = "mask_token" in state
    # Older checkpoints hold a table resampled to their img_size: kept as it is, too.
    _keep_native_grid(backbone, state.get("model.pos_embed"), backbone.pos_prefix_rows, report)
    return dict(state)


def _with_mask(converted: dict[str, Tensor], mask: Tensor | None) -> dict[str, Tensor]:
    target = {f"model.{k}": v for k, v in converted.items()}
    if mask is not None:
        target["mask_token"] = mask
    return target


# --------------------------------------------------------------------- loading
def _strict_load(backbone: Backbone, target: dict[str, Tensor], report: LoadReport) -> None:
    """Load ``target`` into ``backbone``; any key or shape disagreement is a ValueError."""
    expected = backbone.state_dict()
    optional = set() if report.format == "ours" else {"mask_token"}  # timm files have none
    # RoPE periods: absent from timm's own files and our older checkpoints; the
    # architecture's computed ones then stay.
    optional.add("model.rope.periods")
    missing = sorted(set(expected) - set(target) - optional)
    unexpected = sorted(set(target) - set(expected))
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in target.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{report.path} (format={report.format}) does not match the backbone:"]
        lines += [f"  missing keys: {missing}"] if missing else []
        lines += [f"  unexpected keys: {unexpected}"] if unexpected else []
        lines += [f"  shape mismatches: {shapes}"] if shapes else []
        raise ValueError("\n".join(lines))
    backbone.load_state_dict(target, strict=False)  # strictness checked above, minus optional
    report.loaded = sorted(target)
