"""designers: the V-pretraining side (value estimator, feedback heads, task designers)."""

import dinov  # noqa: F401  (installs the torchvision compatibility shim first)
