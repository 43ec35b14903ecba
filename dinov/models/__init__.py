"""dinov.models: the ViT backbone (timm), its checkpoint loading and the DINO/iBOT heads."""

from dinov.models.backbone import (
    ATTENTION_BACKENDS,
    Backbone,
    BackboneOutput,
    TokenState,
    build_backbone,
)
from dinov.models.weights import FORMATS, LoadReport, load_backbone_weights

__all__ = [
    "ATTENTION_BACKENDS",
    "FORMATS",
    "Backbone",
    "BackboneOutput",
    "LoadReport",
    "TokenState",
    "build_backbone",
    "load_backbone_weights",
]
