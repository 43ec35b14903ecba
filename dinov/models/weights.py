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
``Backbone.mask_token``), DINOv3 rope periods are checked rather than silently skipped,
and loading is strict: any missing, unexpected or mis-shaped key is an error naming
the file.

Note on resolution: a model built with ``img_size=224`` stores a 16x16 pos_embed, so a
37x37 official DINOv2 table is downsampled once at load time and re-interpolated from
16x16 for every other input size. Build with the checkpoint's native ``img_size``
(518 for DINOv2) to keep the full table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dinov.checkpoint import load_tensor_file
from dinov.models.backbone import Backbone

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

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors from {self.path} (format={self.format}, "
            f"prefix={self.prefix!r}); ignored {len(self.ignored)}; "
            f"mask_token {'loaded' if self.mask_token_loaded else 'kept'}; "
            + ("; ".join(self.converted) or "no conversions")
        )


def load_backbone_weights(
    backbone: Backbone, path: str | Path, fmt: str = "auto", key: str = "teacher"
) -> LoadReport:
    """Load the backbone weights in ``path`` (format ``fmt``) into ``backbone``, strictly.

    ``key`` picks ``teacher`` or ``student`` in training checkpoints that hold both.
    Raises FileNotFoundError for a missing file and ValueError (naming the file) when the
    keys or shapes do not match the backbone exactly.
    """
    if fmt not in FORMATS:
        raise ValueError(f"weights format must be one of {FORMATS}, got {fmt!r}")
    if key not in ("teacher", "student"):
        raise ValueError(f"weights key must be 'teacher' or 'student', got {key!r}")
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
    target = convert[fmt](backbone, state, report)
    _strict_load(backbone, target, report)
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
    for name in ("pos_embed", "patch_embed.proj.weight"):
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
    # timm recognises the dinov2 layout by the presence of 'mask_token' (and then drops it).
    converted = checkpoint_filter_fn(dict(state, mask_token=torch.zeros(1)), model)
    _note_resamples(state, converted, report)
    return _with_mask(converted, mask)


def _drop_dinov3_extras(backbone: Backbone, state: dict[str, Tensor], report: LoadReport) -> None:
    """Check or drop what the DINOv3 file holds beyond the timm model's parameters."""
    for name in [k for k in state if _DINOV3_TRAINING_ONLY.search(k)]:
        report.ignored.append(name)
        del state[name]
    periods = state.pop("rope_embed.periods", None)
    if periods is not None:
        report.ignored.append("rope_embed.periods")
        ours = getattr(getattr(backbone.model, "rope", None), "periods", None)
        # Official files hold bf16-rounded periods; timm recomputes them in fp32 and skips
        # the file's. Check they agree so a different rope base cannot load silently.
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
    if getattr(backbone.model.blocks[0].attn, "q_bias", None) is None:
        for name in [k for k in state if k.endswith("attn.qkv.bias")]:
            if state[name].abs().max() > 0:
                raise ValueError(
                    f"{report.path}: {name} is non-zero but the architecture has no qkv bias; "
                    "use the *_qkvb variant of the arch"
                )
            report.ignored.append(name)  # all-zero (distilled models): nothing lost
            del state[name]


def _from_dinov3(
    backbone: Backbone, state: dict[str, Tensor], report: LoadReport
) -> dict[str, Tensor]:
    from timm.models.eva import checkpoint_filter_fn

    _require_family(backbone, eva=True, fmt="dinov3")
    state = dict(state)
    mask = _take_mask_token(state, report)
    _drop_dinov3_extras(backbone, state, report)
    if "storage_tokens" not in state:
        # timm recognises the dinov3 layout by 'storage_tokens'; without them nothing is renamed.
        raise ValueError(f"{report.path}: dinov3 weights without storage_tokens are not supported")
    report.converted.append("storage_tokens -> reg_token; ls{1,2}.gamma -> gamma_{1,2}")
    if any(k.endswith("attn.qkv.bias") for k in state):
        report.converted.append("attn.qkv.bias -> q_bias, v_bias (k bias is fixed at 0)")
    converted = checkpoint_filter_fn(state, backbone.model)
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
    converted = checkpoint_filter_fn(state, backbone.model)
    _note_resamples(state, converted, report)
    return _with_mask(converted, mask)


def _from_ours(
    backbone: Backbone, state: dict[str, Tensor], report: LoadReport
) -> dict[str, Tensor]:
    from timm.layers import resample_abs_pos_embed

    target = dict(state)
    report.mask_token_loaded = "mask_token" in target
    pos = target.get("model.pos_embed")
    model = backbone.model
    if pos is not None and getattr(model, "pos_embed", None) is not None:
        if pos.shape != model.pos_embed.shape:
            prefix = 0 if model.no_embed_class else backbone.num_prefix_tokens
            target["model.pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix
            )
            report.converted.append(
                f"pos_embed resampled {tuple(pos.shape)} -> {tuple(model.pos_embed.shape)}"
            )
    return target


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
