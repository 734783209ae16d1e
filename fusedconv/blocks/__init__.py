"""Drop-in re-parameterizable blocks: train with branches, deploy as one conv.

Each block's ``reparameterize()`` merges it in place; ``fusedconv.fuse`` and
``fusedconv.reparameterize`` merge every block of a model at once.
"""

from .acnet import ACBlock
from .base import RepBlock
from .convbn import ConvBN
from .dbb import DiverseBranchBlock
from .implicit import ImplicitA, ImplicitConv, ImplicitM
from .mobileone import MobileOneBlock
from .orepa import OREPABlock
from .replknet import DilatedReparamBlock, LargeKernelConv
from .repvgg import RepConv, RepVGGBlock

__all__ = [
    "ACBlock", "ConvBN", "DilatedReparamBlock", "DiverseBranchBlock", "ImplicitA", "ImplicitConv", "ImplicitM",
    "LargeKernelConv", "MobileOneBlock", "OREPABlock", "RepBlock", "RepConv", "RepVGGBlock",
]
