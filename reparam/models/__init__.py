"""Bundled models, built by name: ``reparam.models.create_model("acnet_resnet18")``."""

from reparam.models import (  # noqa: F401  (registers their models)
    digits,
    mobileone_nets,
    repvgg_nets,
    resnet,
    yolo,
)
from reparam.models.registry import (
    ModelInfo,
    create_model,
    get_model_info,
    list_models,
    register_model,
)

__all__ = ["ModelInfo", "create_model", "get_model_info", "list_models", "register_model"]
