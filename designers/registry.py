"""The task-designer interface and the registry that builds designers by name.

A task designer is a small network (an ``nn.Module``) that decides how the
self-supervised task is built. Whatever the modality, it is used in two ways only:

- ``design = designer.design(inputs, task)``: the designed task for a batch
  (:class:`Design`: the task the learner will see, plus what the regulariser needs; not
  ``apply``, which ``nn.Module`` already defines);
- ``designer.regulariser(design)``: the penalty R(φ) of that design (a scalar tensor),
  which the meta step adds to −V.

Designers register themselves with :func:`register_designer` under the name that
``designer.kind`` selects, together with their config section (a dataclass: its fields
become ``designer.<name>.*``) and the modality whose trainer they plug into. A designer
defined anywhere (a test file, a user's package) becomes available by registering it
before the config is loaded; nothing here has to change. Modality-free: it imports no
vision or language code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@dataclass
class Design:
    """A designed task (``task``: what the learner trains on) and the designer outputs the
    regulariser reads (``outputs``: masks, augmentation parameters, soft targets, ...)."""

    task: Any
    outputs: Any = None


@runtime_checkable
class TaskDesigner(Protocol):
    """What every designer provides (and, being an ``nn.Module``, its parameters)."""

    def design(self, inputs: Any, task: Any) -> Design: ...

    def regulariser(self, design: Design) -> Tensor: ...


@dataclass(frozen=True)
class DesignerSpec:
    """A registered designer: ``build(section, **context)`` makes it from its config
    section (an instance of ``config``, or None when it has none) and what the modality
    knows about the learner (e.g. the patch size)."""

    name: str
    modality: str
    build: Callable[..., nn.Module]
    config: type | None


_REGISTRY: dict[str, DesignerSpec] = {}


def register_designer(name: str, modality: str, config: type | None = None
                      ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``build`` (a designer class or factory) as ``designer.kind=name``."""
    if name == "none":
        raise ValueError("'none' is the baseline (no designer) and cannot be registered")

    def decorate(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        known = _REGISTRY.get(name)
        if known is not None and known.build is not build:
            raise ValueError(f"designer {name!r} is already registered ({known.build!r})")
        _REGISTRY[name] = DesignerSpec(name, modality, build, config)
        return build

    return decorate


def registered_designers(modality: str) -> dict[str, DesignerSpec]:
    """The designers of ``modality``, by name, in registration order."""
    return {name: spec for name, spec in _REGISTRY.items() if spec.modality == modality}


def designer_spec(name: str, modality: str) -> DesignerSpec:
    """The spec of ``designer.kind=name``; an error naming the known kinds otherwise."""
    spec = _REGISTRY.get(name)
    if spec is None or spec.modality != modality:
        known = ["none", *registered_designers(modality)]
        raise ValueError(f"config key 'designer.kind' must be one of {known}, got {name!r}")
    return spec


def build_designer(name: str, modality: str, section: Any, **context: Any) -> nn.Module:
    """Build the designer registered as ``name`` from its config ``section``."""
    designer = designer_spec(name, modality).build(section, **context)
    if not isinstance(designer, TaskDesigner):
        raise TypeError(f"designer {name!r} built a {type(designer).__name__}, which lacks "
                        f"design(inputs, task) -> Design and regulariser(design) -> Tensor")
    return designer
