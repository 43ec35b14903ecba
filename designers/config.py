"""What every modality's V-pretraining config shares: the designer's meta schedule and
optimizer with the fixed-designer control (``designer.*``), and the value estimator
(``value.*``). Each modality extends :class:`DesignerConfig` with its designers' own
sections (``designer.<kind>.*``) and adds its feedback section (vision:
:mod:`designers.vision.config`).
"""

from __future__ import annotations

from dataclasses import dataclass

from designers.value import METHODS
from dinov.config import check_choice, check_range


@dataclass
class DesignerConfig:
    """The task designer and its meta steps, whatever the modality.

    ``kind``: ``none`` (the baseline: the learner's default task, through the same hook)
    or the name of a registered designer (:mod:`designers.registry`). A meta step runs at
    steps ``burn_in, burn_in + every, ...``; before ``burn_in`` the learner sees the
    default task. ``lr``: the designer's Adam learning rate. ``fixed`` is the
    fixed-designer control: the designer at its initialisation shapes every task and is
    never updated (no meta step, no feedback data loaded).
    """

    kind: str = "none"
    every: int = 4
    burn_in: int = 0
    lr: float = 3e-4
    fixed: bool = False

    def __post_init__(self) -> None:
        check_range("designer.every", self.every, 1)
        check_range("designer.burn_in", self.burn_in, 0)
        check_range("designer.lr", self.lr, 0.0, low_open=True)


@dataclass
class ValueConfig:
    """The value estimator.

    ``method`` of the directional derivative (fd|jvp|exact); the aligned set S (last
    ``align_last_n_blocks`` blocks + final norm); the fd step ``eps`` (relative to ‖θ_S‖).
    ``batch_size``: V is evaluated on the first ``batch_size`` rows of the learner's
    batch (the unlabelled meta batch; 0 = the whole batch); the learner still trains on
    the designed task of every row. Per rank: under DDP each rank evaluates V on its
    own rows and the designer gradient is averaged, so the meta batch is world size ×
    ``batch_size``. ``recompute`` (fd only): rebuild the trunk's graph in the backward
    instead of keeping it (less memory, one more trunk forward; see
    :func:`designers.value.directional_derivative_split`).
    """

    method: str = "fd"
    align_last_n_blocks: int = 2
    eps: float = 1e-3
    batch_size: int = 0
    recompute: bool = False

    def __post_init__(self) -> None:
        check_choice("value.method", self.method, METHODS)
        check_range("value.batch_size", self.batch_size, 0)
        # the upper bound is the learner's depth: checked when the designer is set up
        check_range("value.align_last_n_blocks", self.align_last_n_blocks, 1)
        check_range("value.eps", self.eps, 0.0, low_open=True)  # fd divides by it
