"""What every drop-in block shares: train with branches, deploy as one conv."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FoldError
from ..reparam import Reparameterization, apply_reparameterizations, check_reparameterization


class RepBlock(nn.Module):
    """Base of fusedconv's re-parameterizable blocks.

    A subclass builds its branches in ``__init__``, computes their sum in
    :meth:`forward_branches`, and describes its merge in
    :meth:`reparameterization`. After :meth:`reparameterize` the block holds a
    single conv, ``deployed_conv``, and its forward is
    ``activation(deployed_conv(x))``.
    """

    branch_names: tuple[str, ...] = ()
    """Attributes holding the training-time branches; deleted once deployed."""

    def __init__(self, activation: nn.Module | None = None):
        super().__init__()
        self.activation = activation if activation is not None else nn.Identity()
        self.deployed_conv: nn.Module | None = None

    @property
    def deployed(self) -> bool:
        return self.deployed_conv is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed_conv is not None:
            return self.activation(self.deployed_conv(x))
        return self.activation(self.forward_branches(x))

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The training-time sum of the branches (before the activation)."""
        raise NotImplementedError

    def reparameterization(self, name: str) -> Reparameterization:
        """The merge of this block into one conv (nothing is modified); ``name``
        labels errors. Raises :class:`FoldError` when a branch cannot be merged."""
        raise NotImplementedError

    def install(self, conv: nn.Module) -> None:
        """Replace the branches by the merged ``conv`` (called by the merge)."""
        for name in self.branch_names:
            delattr(self, name)
        self.deployed_conv = conv

    def reparameterize(self, backend: str | None = None) -> nn.Module:
        """Merge the branches into one conv, in place, and return the block.

        The block must be in eval mode (its BatchNorms' running statistics are
        what gets merged). All or nothing: on an error the block is unchanged.
        """
        if self.deployed:
            return self
        if self.training:
            raise FoldError(f"{type(self).__name__} is in training mode: call .eval() before reparameterize()")
        apply_reparameterizations([check_reparameterization(self.reparameterization(type(self).__name__))],
                                  backend)
        return self
