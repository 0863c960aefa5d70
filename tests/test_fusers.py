"""The fuser registry: register, unregister, scoped override, lookup along the MRO, listing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import reparam
from reparam import convert, fusers
from reparam.blocks import ACBlock, DiverseBranchBlock, MobileOneBlock, RepVGGBlock


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


class SubDoubler(Doubler):
    pass


def to_scale(block: nn.Module) -> nn.Module:
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(2.0)
    return conv


def test_register_and_unregister_with_lookup_along_the_mro():
    assert fusers.get_fuser(SubDoubler) is None
    fusers.register_fuser(Doubler, to_scale)
    try:
        assert fusers.get_fuser(SubDoubler) is to_scale
        assert {"Doubler", "SubDoubler"} <= set(fusers.list_fusers())
        fused = reparam.fuse(nn.Sequential(SubDoubler()))
        assert isinstance(fused[0], nn.Conv2d)
    finally:
        assert fusers.unregister_fuser(Doubler) is to_scale
    assert fusers.get_fuser(SubDoubler) is None and "Doubler" not in fusers.list_fusers()
    assert fusers.unregister_fuser(Doubler) is None


def test_override_is_scoped_and_restores_the_previous_fuser():
    original = fusers.get_fuser(ACBlock)
    assert original is not None

    def keep(block):
        return None

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a scoped override does not warn
        with fusers.override_fuser(ACBlock, keep):
            assert fusers.get_fuser(ACBlock) is keep
            fused = reparam.fuse(nn.Sequential(ACBlock(2, 2)))
            assert not fused[0].deploy
    assert fusers.get_fuser(ACBlock) is original
    with pytest.raises(RuntimeError), fusers.override_fuser(Doubler, keep):
        raise RuntimeError
    assert fusers.get_fuser(Doubler) is None


def test_list_fusers_names_every_bundled_block():
    names = set(fusers.list_fusers())
    assert {"ACBlock", "RepVGGBlock", "DiverseBranchBlock", "MobileOneBlock"} <= names
    for block in (ACBlock, RepVGGBlock, DiverseBranchBlock, MobileOneBlock):
        assert fusers.get_fuser(block) is not None


def test_convert_and_package_reexport_the_same_registry():
    assert convert.register_fuser is fusers.register_fuser
    assert convert.unregister_fuser is fusers.unregister_fuser
    assert convert.override_fuser is fusers.override_fuser
    assert reparam.list_fusers is fusers.list_fusers and reparam.get_fuser is fusers.get_fuser
    assert reparam.FuseOutcome is fusers.FuseOutcome


def test_builtin_registration_is_explicit_and_idempotent():
    """reparam.builtins registers the block fuser, fx leaves and the adoption pass; calling it
    again (as every fuse does) adds nothing and warns about nothing (issue 20 item 3)."""
    import warnings

    from reparam.adopt import adopt_foreign_blocks
    from reparam.blocks import DRConv2d, ReparamBlock
    from reparam.builtins import register_builtins

    register_builtins()
    before = (fusers.leaf_module_types(), fusers.pre_fuse_passes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_builtins()
        fusers.register_pre_fuse_pass(adopt_foreign_blocks)  # as an import side effect would
    assert (fusers.leaf_module_types(), fusers.pre_fuse_passes()) == before
    assert fusers.pre_fuse_passes().count(adopt_foreign_blocks) == 1
    assert DRConv2d in fusers.leaf_module_types() and fusers.get_fuser(ReparamBlock) is not None
