"""mmsegmentation adapter: our ViT backbone (and DINOv2's linear ``BNHead``) as mmseg modules.

Importing this module registers, in mmseg's ``MODELS`` registry:

``VPretrainViT``
    a backbone built from any source the other eval CLIs take (a checkpoint of our
    trainer, an official DINOv2/DINOv3 file, a timm model + state dict, or random init;
    see :mod:`eval.common`). Its constructor takes the fields of
    :class:`dinov.config.ModelConfig` as keyword arguments (``arch``, ``img_size``,
    ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``weights``,
    ``weights_format``, ``weights_key``, ...) plus ``out_indices`` (which blocks to
    output), ``norm`` (apply the final norm to every output, as DINOv2's segmentation
    evals do) and ``frozen`` (the linear-probe protocol: no gradients, eval mode).
    ``forward`` returns one ``(B, D, h, w)`` map of patch tokens per out index, all at
    stride ``patch_size``. For UPerNet the configs turn them into a 4-level pyramid
    (strides 4, 8, 16, 32 for patch 16) with mmseg's ``MultiLevelNeck``, as mmseg's own
    ViT + UPerNet recipe does.
``BNHead``
    DINOv2's linear segmentation head (mmseg 1.x has none): the selected maps are
    resized to the first one and concatenated, then BatchNorm and a 1x1 conv classify.

Configs: ``configs/mmseg/linear_ade20k.py`` (frozen backbone, BNHead, 40k iters) and
``configs/mmseg/upernet_ade20k.py`` (fine-tuned backbone, MultiLevelNeck + UPerHead +
auxiliary FCNHead, 80k iters). They name this module in ``custom_imports``, so mmseg's
and mim's own training tools pick it up; without them, train with

    python -m eval.mmseg_backbone configs/mmseg/linear_ade20k.py --work-dir runs/seg \\
        --cfg-options model.backbone.weights=runs/x/checkpoints/checkpoint_00010000.pt

The extra is optional and heavy: ``pip install -e '.[mmseg]'`` needs mmcv < 2.2
compiled from source (``make test-mmseg`` does it in ``.venv-mmseg``; by hand:
``pip install "setuptools<81" wheel ninja`` then
``MAX_JOBS=2 pip install --no-build-isolation "mmcv>=2.0.0rc4,<2.2.0"``, DESIGN.md
section 7). ``mmseg.utils`` imports ``ftfy`` and ``regex`` at import time (its CLIP
tokenizer), so both are needed too. ``import eval`` never imports this module.

Compatibility with current torch/numpy (mmseg 1.2.2, mmengine 0.10.7, mmcv 2.1.0,
torch 2.13, numpy 2): see :func:`_install_compat` for what is patched and why.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pickle
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dinov import _compat  # noqa: F401  (mmcv/mmseg import torchvision: the shim runs first)
from dinov.config import ConfigError, ModelConfig
from dinov.data.datasets import numpy_pickle_globals
from eval.common import build_eval_backbone
from eval.pipeline import prepare_output_dir

INSTALL_HINT = (
    "the mmsegmentation adapter needs the [mmseg] extra: pip install -e '.[mmseg]' "
    "(mmcv>=2.0.0rc4,<2.2.0 has no wheel for recent torch and is compiled from source: "
    "first pip install 'setuptools<81' wheel ninja, then MAX_JOBS=2 pip install "
    "--no-build-isolation 'mmcv>=2.0.0rc4,<2.2.0'), or run `make test-mmseg`, which "
    "builds all of it in .venv-mmseg"
)

try:
    import mmcv  # noqa: F401
    import mmengine  # noqa: F401
    import mmseg  # noqa: F401  (asserts mmcv < 2.2.0 at import)
    from mmcv.cnn import build_norm_layer
    from mmengine.model import BaseModule
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    from mmseg.registry import MODELS
except ImportError as err:
    raise ImportError(f"{INSTALL_HINT} (import failed: {err})") from err
except AssertionError as err:  # mmseg's own version check (e.g. mmcv 2.2 installed)
    raise ImportError(f"{INSTALL_HINT} (version check failed: {err})") from err

_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


_HISTORY_STATISTICS = ("min", "max", "current", "mean")


def _history_statistic(owner: Any, name: str) -> Any:
    """``getattr`` as mmengine checkpoints use it, and only so.

    A ``HistoryBuffer`` pickles its statistics methods as ``getattr(HistoryBuffer, "min")``;
    a general ``getattr`` would let a crafted file reach any attribute of any allowed
    object (``ndarray.tofile``, ``type.__subclasses__``, ...).
    """
    from mmengine.logging import HistoryBuffer

    registered = (*_HISTORY_STATISTICS, *HistoryBuffer._statistics_methods)
    if owner is not HistoryBuffer or name not in registered:
        raise pickle.UnpicklingError(
            f"refusing getattr({owner!r}, {name!r}): only HistoryBuffer statistics "
            f"{sorted(set(registered))} are allowed"
        )
    return getattr(HistoryBuffer, name)


def checkpoint_safe_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` must admit besides tensors for mmengine's own
    checkpoints: the message hub's ``HistoryBuffer`` objects and the numpy arrays, dtypes
    and scalars they hold (found with ``torch.serialization.get_unsafe_globals_in_checkpoint``
    on the checkpoints of a training run)."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    # BUILD restores a dtype's state only for allowlisted types: numpy >= 1.20 gives each
    # dtype its own class (numpy.dtypes.Float64DType, ...).
    dtype_classes = sorted({type(np.dtype(code)) for code in np.typecodes["All"]}, key=str)
    numpy_globals = [(obj, path) for path, obj in numpy_pickle_globals().items()]
    return [HistoryBuffer, *dtype_classes, *numpy_globals, (_history_statistic, "builtins.getattr")]


def _install_compat() -> None:
    """Patch what mmengine 0.10.7 gets wrong with current torch; idempotent.

    Checked here with mmseg 1.2.2, mmengine 0.10.7, mmcv 2.1.0 (built from source),
    torch 2.13 and numpy 2.4: model building, training, validation (IoUMetric) and
    checkpoint saving need nothing. One thing does:

    - **Resuming / ``load_from``.** mmengine's local checkpoint loader calls
      ``torch.load`` without ``weights_only``: before torch 2.6 that is a full pickle (a
      crafted checkpoint runs code), from 2.6 on it refuses mmengine's own checkpoints
      (they pickle ``HistoryBuffer`` objects and numpy arrays of the message hub). The
      local-file loader is re-registered to load with ``weights_only=True`` and the
      handful of types those checkpoints hold (:func:`checkpoint_safe_globals`), so
      resume works and any other global is refused with an error naming the file. The
      allowlist's ``(callable, name)`` entries need torch >= 2.6.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    loader = CheckpointLoader._schemes.get("")
    if getattr(loader, "_vpretrain_weights_only", False):
        return

    def load_from_local(filename: str, map_location: Any = None) -> Any:
        path = os.path.expanduser(filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} can not be found.")
        try:
            with torch.serialization.safe_globals(checkpoint_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise pickle.UnpicklingError(f"checkpoint {path} refused: {error}") from None

    load_from_local._vpretrain_weights_only = True  # type: ignore[attr-defined]
    CheckpointLoader.register_scheme(prefixes="", loader=load_from_local, force=True)


_install_compat()


class VPretrainViT(BaseModule):
    """Our :class:`~dinov.models.backbone.Backbone` as an mmseg backbone (see the module doc).

    Args:
        out_indices: blocks whose outputs are returned, in increasing order; negative
            values count from the last block (``-1``: the last one).
        norm: pass each output through the backbone's final norm (DINOv2's linear and
            multi-scale segmentation evals do); ``False`` returns raw block outputs.
        frozen: freeze the backbone (no gradients, kept in eval mode even when the
            segmentor trains): the linear-probe protocol.
        pretrained: what mmseg's ``EncoderDecoder(pretrained=...)`` passes down; an
            alias of ``weights``.
        init_cfg: accepted for mmengine's BaseModule; must stay ``None`` because the
            weights come from ``weights`` at construction (see :meth:`init_weights`).
        **model_cfg: fields of :class:`dinov.config.ModelConfig`.
    """

    def __init__(
        self,
        out_indices: Sequence[int] = (-1,),
        norm: bool = True,
        frozen: bool = False,
        pretrained: str | None = None,
        init_cfg: dict[str, Any] | None = None,
        **model_cfg: Any,
    ) -> None:
        super().__init__(init_cfg=None)
        if init_cfg is not None:
            raise ValueError("VPretrainViT loads its weights itself: set weights=..., not init_cfg")
        unknown = sorted(set(model_cfg) - _MODEL_FIELDS)
        if unknown:
            raise TypeError(
                f"VPretrainViT got unknown arguments {unknown}; it takes out_indices, norm, "
                f"frozen and the ModelConfig fields {sorted(_MODEL_FIELDS)}"
            )
        if pretrained is not None:
            if model_cfg.get("weights") not in (None, pretrained):
                raise ValueError("set either weights or pretrained, not both")
            model_cfg["weights"] = pretrained
        # build_eval_backbone resolves every weight source (our checkpoints carry their own
        # architecture); it returns a frozen eval-mode module, unfrozen below if asked.
        self.backbone = build_eval_backbone(ModelConfig(**model_cfg))
        self.backbone.requires_grad_(not frozen)
        self.frozen = frozen
        self.norm = norm
        self.out_indices = self._normalize_indices(out_indices, self.backbone.num_blocks)
        self.embed_dim = self.backbone.embed_dim
        self.patch_size = self.backbone.patch_size

    @staticmethod
    def _normalize_indices(indices: Sequence[int], num_blocks: int) -> tuple[int, ...]:
        """Negative indices count from the end; the result must be strictly increasing."""
        if isinstance(indices, int):
            indices = (indices,)
        out = tuple(i + num_blocks if i < 0 else i for i in indices)
        if not out or any(not 0 <= i < num_blocks for i in out):
            raise ValueError(f"out_indices {tuple(indices)} out of range for {num_blocks} blocks")
        if any(b <= a for a, b in zip(out, out[1:], strict=False)):
            raise ValueError(f"out_indices must be strictly increasing, got {tuple(indices)}")
        return out

    def init_weights(self) -> None:
        """Keep the loaded weights: mmengine's Runner calls ``init_weights`` after building the
        model, and BaseModule's default would recurse into timm's own ``init_weights``,
        re-initialising the backbone."""

    def train(self, mode: bool = True) -> VPretrainViT:
        """A frozen backbone stays in eval mode (no dropout / drop-path) while heads train."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """(B, 3, H, W) normalised images -> one (B, D, ceil(H/p), ceil(W/p)) map per out index.

        Blocks after the last out index are not run.
        """
        grad = contextlib.nullcontext() if not self.frozen else torch.no_grad()
        with grad:
            outputs = self.backbone.forward_intermediates(images, self.out_indices, norm=self.norm,
                                                         output_fmt="NCHW")
        return tuple(out.patch for out in outputs)


class BNHead(BaseDecodeHead):
    """DINOv2's linear segmentation head: (resize + concat), BatchNorm, 1x1 conv.

    Use ``input_transform='resize_concat'`` with several maps (``channels`` = the sum of
    ``in_channels``) or a single map (``channels`` = ``in_channels``). The norm layer
    follows ``norm_cfg`` (``SyncBN`` in the configs; ``BN`` when unset).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.channels != self.in_channels:
            raise ValueError(
                f"BNHead is linear: channels ({self.channels}) must equal the (concatenated) "
                f"input channels ({self.in_channels})"
            )
        norm_cfg = self.norm_cfg if self.norm_cfg is not None else dict(type="BN")
        self.bn: nn.Module = build_norm_layer(norm_cfg, self.in_channels)[1]

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """Selected backbone maps -> (B, num_classes, h, w) logits at the first map's size."""
        return self.cls_seg(self.bn(self._transform_inputs(inputs)))


# Registered only under the importable name: `python -m eval.mmseg_backbone` runs this file
# as __main__, and the configs' custom_imports then import eval.mmseg_backbone again; a
# second registration of the same names would be a KeyError in mmengine's registry.
if __name__ != "__main__":
    MODELS.register_module(module=VPretrainViT)
    MODELS.register_module(module=BNHead)


# ---------------------------------------------------------------------- training CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Train (and validate) a segmentor from an mmseg config with mmengine's Runner.

    pip's mmsegmentation does not ship mmseg's ``tools/train.py``; this is its core.
    """
    from mmengine.config import Config, DictAction
    from mmengine.runner import Runner

    parser = argparse.ArgumentParser(
        prog="python -m eval.mmseg_backbone",
        description="Train an mmseg segmentor on our backbone (configs/mmseg/*.py).",
    )
    parser.add_argument("config", help="mmseg config file, e.g. configs/mmseg/linear_ade20k.py")
    parser.add_argument("--work-dir", required=True, help="where logs and checkpoints go")
    parser.add_argument(
        "--cfg-options", nargs="+", action=DictAction, default={},
        help="key=value overrides, e.g. model.backbone.weights=ckpt.pt "
        "train_dataloader.dataset.data_root=/data/ADEChallengeData2016",
    )
    parser.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
    args = parser.parse_args(argv)
    try:
        prepare_output_dir(args.work_dir, "--work-dir")  # before any work, as every eval CLI
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = args.work_dir
    cfg.resume = args.resume
    Runner.from_cfg(cfg).train()
    return 0


if __name__ == "__main__":
    from eval.mmseg_backbone import main as _main  # the registered copy (see above)

    raise SystemExit(_main())
