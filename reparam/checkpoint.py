"""Checkpoints: the public names of the three modules that do the work, in one place.

- :mod:`reparam.user_code`: building the model a user names (bundled name or
  ``package.module:callable``, resolved as ``python -m`` would).
- :mod:`reparam.safe_weights`: reading training checkpoints without running code, finding the
  state dict inside (EMA entries first), loading it with strict keys.
- :mod:`reparam.fused_format`: writing the fused checkpoint and rebuilding the deploy model
  from it (:func:`load`, :func:`save_fused`).
"""

from __future__ import annotations

from reparam.fused_format import (
    FORMAT,
    FORMAT_VERSION,
    is_fused_checkpoint,
    load,
    probe_inputs,
    save_fused,
)
from reparam.safe_weights import (
    Weights,
    apply_state_dict,
    load_state_dict_file,
    read_weights,
)
from reparam.user_code import ModelSpec, build_model

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelSpec",
    "Weights",
    "apply_state_dict",
    "build_model",
    "is_fused_checkpoint",
    "load",
    "load_state_dict_file",
    "probe_inputs",
    "read_weights",
    "save_fused",
]
