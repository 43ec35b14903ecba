"""eval: evaluation pipelines (linear, kNN, segmentation, depth, retrieval) for frozen backbones."""

import dinov  # noqa: F401  (installs the torchvision compatibility shim first)
