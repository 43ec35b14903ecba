"""Make a CUDA build of torchvision importable next to a CPU-only torch.

On machines where the only torchvision matching the installed torch is a CUDA build
(e.g. torch 2.13.0+cpu with torchvision 0.28.0+cu130), ``import torchvision`` fails with
``operator torchvision::nms does not exist``: its Python side registers fake kernels for
C++ operators whose schemas live in the missing CUDA extension. timm and transformers
import torchvision, so they fail too. Defining the two missing schemas before the first
import makes everything except ``torchvision.ops.nms`` and ``torchvision.io`` work
(we decode images with PIL). GPU users with matching builds never take this path.

Every package of the project imports this module first.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None  # kept alive: the schemas die with it


def _torchvision_build_tag() -> str | None:
    """The local version tag of the installed torchvision (``cu130``, ``cpu``) without importing it."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    version_file = pathlib.Path(spec.origin).with_name("version.py")
    if not version_file.exists():
        return None
    match = re.search(r"__version__\s*=\s*'[^'+]*\+?([^']*)'", version_file.read_text())
    return match.group(1) if match else None


def needs_torchvision_shim() -> bool:
    """True when torch has no CUDA but the installed torchvision was built for CUDA."""
    if "torchvision" in sys.modules or torch.version.cuda is not None:
        return False
    tag = _torchvision_build_tag()
    return bool(tag) and tag.startswith("cu")


def install_torchvision_shim() -> None:
    global _library
    if _library is not None or not needs_torchvision_shim():
        return
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)


install_torchvision_shim()
