"""The bundled model names, written out so that help text needs no ``import torch``.

Each subcommand's ``--help`` lists them; importing the registry would import torch and every
model module (2-3 s). ``tests/test_cli_help.py`` checks this list equals
:func:`reparam.models.list_models`.
"""

__all__ = ["BUNDLED_MODELS"]

BUNDLED_MODELS = (
    "acnet_resnet18",
    "acnet_tiny",
    "dbb_resnet18",
    "dbb_tiny",
    "digits_net",
    "mobileone_s0",
    "mobileone_s1",
    "mobileone_s2",
    "mobileone_s3",
    "mobileone_s4",
    "mobileone_tiny",
    "repvgg_a0",
    "repvgg_a1",
    "repvgg_a2",
    "repvgg_b0",
    "repvgg_b1",
    "repvgg_b1g2",
    "repvgg_b1g4",
    "repvgg_b2",
    "repvgg_b2g2",
    "repvgg_b2g4",
    "repvgg_b3",
    "repvgg_b3g2",
    "repvgg_b3g4",
    "repvgg_tiny",
    "resnet18",
    "yolo_asff_tiny",
)
