"""fusedconv: fold every BatchNorm of a PyTorch model into the layer beside it, exactly.

>>> import fusedconv
>>> fused = fusedconv.fuse(model.eval(), example_inputs=(x,))
>>> print(fusedconv.verify(model, fused, (x,)))
"""

import logging

from .api import fuse, plan, reparameterize
from .checkpoint import CheckpointReport, fold_checkpoint, fold_state_dict, load_folded
from .errors import BackendUnavailable, ExtensionBuildWarning, FoldError, FoldWarning, MissingExtensionWarning
from .fold import fold_bn_conv, fold_conv_bn, folded_weights
from .layers import count_batchnorms
from .fusion_plan import Fold, FusionPlan, Skip
from .registry import register_block
from . import blocks, thirdparty  # noqa: F401  (thirdparty: the zoos' converters, registered by name)
from .verification import ErrorStats, VerificationReport, verify

__version__ = "0.1.0"

# A library logs; the application decides where it goes.
logging.getLogger("fusedconv").addHandler(logging.NullHandler())

__all__ = [
    "BackendUnavailable",
    "CheckpointReport",
    "ErrorStats",
    "ExtensionBuildWarning",
    "Fold",
    "FoldError",
    "FoldWarning",
    "FusionPlan",
    "MissingExtensionWarning",
    "Skip",
    "VerificationReport",
    "blocks",
    "count_batchnorms",
    "fold_bn_conv",
    "fold_conv_bn",
    "fold_checkpoint",
    "fold_state_dict",
    "folded_weights",
    "fuse",
    "load_folded",
    "plan",
    "register_block",
    "reparameterize",
    "verify",
]
