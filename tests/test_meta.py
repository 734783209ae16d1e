"""Planning and folding structure on the meta device (issue 12, item 1).

A model built under ``torch.device("meta")`` has no values: ``plan`` works from
its structure, and ``fuse`` returns the folded *structure* (BNs replaced, a
bias where a fold needs one), into which the state dict of the same model
folded with real weights loads with ``assign=True`` and computes the same bits.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusedconv
from fusedconv.blocks import RepVGGBlock
from utils import assert_structure_takes_the_fold, randomize_batchnorm_stats

MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0"]


pytestmark = pytest.mark.usefixtures("fixed_seed")  # tests/conftest.py


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_meta_structure_loads_the_real_fold(name, inplace):
    torchvision = pytest.importorskip("torchvision")
    build = getattr(torchvision.models, name)
    with torch.device("meta"):
        skeleton = build().eval()
    real = randomize_batchnorm_stats(build(), torch.Generator().manual_seed(1)).eval()

    meta_plan, real_plan = fusedconv.plan(skeleton), fusedconv.plan(real)
    assert meta_plan.folds == real_plan.folds and not meta_plan.skipped

    structure = fusedconv.fuse(skeleton, inplace=inplace)
    assert (structure is skeleton) == inplace
    assert_structure_takes_the_fold(structure, fusedconv.fuse(real), torch.randn(1, 3, 64, 64))


def test_mixed_meta_and_real_layers_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    model[0].to("meta")
    with pytest.raises(fusedconv.FoldError, match="meta device and some are not"):
        fusedconv.fuse(model)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("with_a_fold", [False, True])
def test_blocks_merge_their_structure_on_meta(with_a_fold, inplace):
    def build():
        layers = [RepVGGBlock(4, 4, 3)] + ([nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)] if with_a_fold else [])
        return nn.Sequential(*layers).eval()

    with torch.device("meta"):
        model = build()
    plan = fusedconv.plan(model)  # the structure plans without values
    assert plan.merges == ["0"] and plan.num_folded == (1 if with_a_fold else 0)
    structure = fusedconv.fuse(model, inplace=inplace)
    assert (structure is model) == inplace
    real = randomize_batchnorm_stats(build(), torch.Generator().manual_seed(2))
    assert_structure_takes_the_fold(structure, fusedconv.fuse(real), torch.randn(2, 4, 8, 8))


def test_a_model_that_is_a_block_folds_its_structure_into_a_copy():
    with torch.device("meta"):
        block = RepVGGBlock(4, 4, 3).eval()
    structure = fusedconv.fuse(block)
    assert list(structure.state_dict()) == ["deployed_conv.weight", "deployed_conv.bias"]
    assert fusedconv.count_batchnorms(block) == 3  # the caller's block is as it was
    with pytest.raises(fusedconv.FoldError, match="itself a block.*inplace=False"):
        fusedconv.fuse(block, inplace=True)

def test_a_plan_that_does_not_fit_leaves_the_meta_model_as_it_was():
    """A plan made for another model fails halfway through the structure's fold
    (the layer gains its bias before the BN's swap is found impossible): every
    change is undone."""
    plan = fusedconv.plan(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval())
    with torch.device("meta"):
        other = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU()).eval()
    with pytest.raises(fusedconv.FoldError, match="1: the plan folds it, but ReLU is not a BatchNorm"):
        fusedconv.fuse(other, plan=plan, inplace=True)
    assert other[0].bias is None and "bias" in other[0]._parameters and isinstance(other[1], nn.ReLU)
