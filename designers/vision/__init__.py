"""V-pretraining for vision: the DINO/iBOT learner's designers, feedback and step hook.

- :mod:`designers.vision.config`: the run's typed config (designer sections, feedback);
- :mod:`designers.vision.masks`, :mod:`designers.vision.augment`: the registered
  designers (``mask``, ``token_mask``, ``augment``);
- :mod:`designers.vision.feedback`: feedback pools and heads, ``g_down``;
- :mod:`designers.vision.value`: V of a designed DINO task (the value closure);
- :mod:`designers.vision.hook`: the step hook that drives :class:`designers.meta.MetaCore`.

Importing the package registers the built-in designers.
"""

VISION = "vision"  # the modality name vision designers register under

from designers.vision import augment, masks  # noqa: E402,F401  (register the built-ins)
