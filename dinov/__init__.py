"""dinov: a DINO/iBOT student-teacher trainer (the learner side of V-pretraining)."""

from dinov import _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"
