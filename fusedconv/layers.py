"""Which modules fusedconv folds, and how to read them.

Two roles:

* a **layer** (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear) keeps running and
  absorbs the BatchNorms beside it into its weight and bias;
* a **batch norm** (torch ``BatchNorm*d``/``SyncBatchNorm``, ``FrozenBatchNorm2d``
  from torchvision, timm's ``BatchNormAct2d`` family) disappears: it is replaced
  by ``nn.Identity`` or, for the timm modules that also apply an activation, by
  that activation.

A module is only trusted when the class that defines its ``forward`` is one we
know: a subclass that overrides ``forward`` (weight standardization, "same"
padding computed on the fly, ...) may use its weight differently, so it is
left alone.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.nn.utils import parametrize

from . import distributed
from .affine import BatchNormStats
from .errors import FoldError


class LayerKind(enum.Enum):
    """How a layer's weight is laid out: which axis holds output channels."""

    CONV = "conv"  # (out, in/groups, *kernel)
    CONV_TRANSPOSE = "conv_transpose"  # (in, out/groups, *kernel)
    LINEAR = "linear"  # (out, in)


# Classes whose code fusedconv has read: every class of torch.nn.modules, and
# the library BatchNorms listed in BATCHNORM_KINDS below. A module is standard
# only if every method its forward can reach is one of theirs.
_TRUSTED_CLASS_NAMES = frozenset({
    "torchvision.ops.misc.FrozenBatchNorm2d",
    "timm.layers.norm_act.BatchNormAct2d",
    "timm.layers.norm_act.SyncBatchNormAct",
    "timm.layers.norm_act.FrozenBatchNormAct2d",
})
# What a subclass may define without changing what the trusted forward computes.
_HARMLESS_OVERRIDES = frozenset({
    "__init__", "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
    "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__", "__slotnames__",
    "__annotate_func__", "__annotations_cache__", "__classcell__",
    "extra_repr", "reset_parameters", "__repr__", "_version", "__constants__",
    # copying and pickling
    "__getstate__", "__setstate__", "__reduce__", "__reduce_ex__", "__copy__", "__deepcopy__",
})
# nn.Module's own bookkeeping, held in every instance's __dict__.
MODULE_STATE = frozenset(vars(nn.Module()))


def _trusted(klass: type) -> bool:
    return klass.__module__.startswith("torch.nn.modules.") or klass is object or (
        f"{klass.__module__}.{klass.__qualname__}" in _TRUSTED_CLASS_NAMES)


@functools.lru_cache(maxsize=1024)  # bounded: a program may make classes on the fly
def _trusted_class_names(cls: type) -> frozenset[str] | None:
    """For a class whose whole MRO is trusted (torch's own classes, which nobody
    is expected to patch, and which keep torch's ``__getattr__`` and
    ``__getattribute__``): every name its classes define, worked out once per
    class. None for any other class, whose methods are examined afresh every
    time (its code may change between two plans)."""
    if not all(_trusted(klass) for klass in cls.__mro__):
        return None
    return frozenset(name for klass in cls.__mro__ for name in vars(klass))


def _forward_owner(module: nn.Module) -> str:
    """Qualified name of the class whose ``forward`` the module runs."""
    for klass in type(module).__mro__:
        if "forward" in vars(klass):
            return f"{klass.__module__}.{klass.__qualname__}"
    return ""


def why_not_standard(module: nn.Module, proven: frozenset[str] = frozenset()) -> str | None:
    """Why ``module`` may not compute what its trusted base class's code computes, or None.

    The trusted forward (torch's ``Conv2d.forward``, ``_BatchNorm.forward``,
    ``Sequential.forward``, ...) reaches other methods through ``self``
    (``_conv_forward``, ``_check_input_dim``, ``__iter__``, ``__getattr__``,
    ``__call__``) and reads attributes through ``self`` (``self.weight``). So a
    module is standard only if none of its untrusted classes redefines a name
    that a trusted class of its MRO defines, no class attribute shadows a
    registered parameter, buffer or submodule (nn.Module finds those only when
    ordinary lookup fails), no untrusted class attribute shadows an instance
    attribute, and the instance replaces none of its class's methods.
    ``proven`` names overrides shown harmless by other means (a forward that is
    provably a plain conv, :mod:`fusedconv.dataflow.layer_forward`). A module
    whose class FSDP2's ``fully_shard`` swapped is judged by its original class
    (:func:`fusedconv.distributed.original_class`): FSDPModule's methods manage
    parameters and are never reached by a forward, but they still hide
    registered names of theirs.
    """
    cls = type(module)
    registered = (module._parameters.keys() | module._buffers.keys() | module._modules.keys())
    original = distributed.original_class(module)
    if original is not None:
        shadows = registered & vars(distributed.fsdp_module_class()).keys()
        if shadows:
            return f"FSDPModule defines {sorted(shadows)[0]} at class level, which hides the registered one"
        cls = original
    trusted_names = _trusted_class_names(cls)
    if trusted_names is not None:  # every class is trusted: only the instance can differ
        shadows = registered & trusted_names
        if shadows:  # e.g. a torch class that gained a class attribute: still shadowed
            return f"{cls.__qualname__} defines {sorted(shadows)[0]} at class level, which hides the registered one"
        # Only an instance attribute that a class defines can replace a method (rarely any: few are asked about).
        replaced = sorted(name for name in (vars(module).keys() - MODULE_STATE) & trusted_names
                          if callable(getattr(cls, name, None)))
        return f"its {replaced[0]} is replaced on the instance" if replaced else None
    mro = cls.__mro__
    trusted = [klass for klass in mro if _trusted(klass)]
    for klass in mro:
        if _trusted(klass):
            shadows = registered & vars(klass).keys()
            if shadows:
                return f"{klass.__qualname__} defines {sorted(shadows)[0]} at class level, which hides the registered one"
            continue
        for name in vars(klass):
            if name in _HARMLESS_OVERRIDES or name in proven:
                continue
            base = next((t for t in trusted if name in vars(t)), None)
            if base is not None:
                return f"{klass.__qualname__} overrides {base.__qualname__}.{name}, which its forward may reach"
            if name in registered:
                return f"{klass.__qualname__} defines {name} at class level, which hides the registered one"
            if name in vars(module):
                return f"{klass.__qualname__} defines {name} at class level, which may hide the instance's own"
    for name in vars(module).keys() - MODULE_STATE:
        if callable(getattr(cls, name, None)):
            return f"its {name} is replaced on the instance"
    return None


_STANDARD_LAYER_FORWARDS = {
    f"torch.nn.modules.conv.{name}"
    for name in ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")
} | {"torch.nn.modules.linear.Linear"}


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a foldable layer, or None if the module is not one."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return LayerKind.CONV_TRANSPOSE if module.transposed else LayerKind.CONV
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    return None


def layer_groups(module: nn.Module) -> int:
    return getattr(module, "groups", 1)


def layer_out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def layer_in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def batched_rank(module: nn.Module) -> int:
    """Rank of a batched input to the layer (and of its output)."""
    if isinstance(module, nn.Linear):
        return 2
    return 2 + len(module.kernel_size)


def pads_with_zeros(conv: nn.Module) -> bool:
    """True when the convolution reads zeros outside its input.

    A BatchNorm before such a conv cannot be folded: the conv would see
    BN(x) padded with zeros, which is not BN of x padded with anything.
    Reflect/replicate/circular padding copies input values, so it commutes
    with a per-channel affine map.
    """
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return False
        # "same": total padding per dim is dilation * (kernel - 1)
        return any(d * (k - 1) > 0 for k, d in zip(conv.kernel_size, conv.dilation))
    return any(p > 0 for p in conv.padding)


def registered_attribute(module: nn.Module, name: str) -> object:
    """``getattr(module, name, None)``, read where nn.Module registers parameters,
    buffers and children whenever the ordinary lookup would not find the name.

    nn.Module's ``__getattr__`` reaches its registries only after the ordinary
    lookup has failed and raised an AttributeError, a microsecond per read.
    That lookup fails when neither the instance dict nor a class of the MRO
    holds the name: nn.Module's ``__setattr__`` and ``register_*`` keep a
    registered name out of both, but code can still write either directly. For
    torch's own classes (whose names are read once, :func:`_trusted_class_names`)
    the instance dict is looked at, then the registries in the order
    ``__getattr__`` reads them, and a name found nowhere (``running_mean`` of a
    conv) is None; any other class is left to ``getattr``.
    """
    defined = _trusted_class_names(type(module))
    if defined is not None and name not in defined and name not in module.__dict__:
        if name in module._parameters:
            return module._parameters[name]
        if name in module._buffers:
            return module._buffers[name]
        return module._modules.get(name)  # None: where the ordinary lookup ends, raising in __getattr__
    return getattr(module, name, None)


_REGISTER_PARAMETER = nn.Module.register_parameter


def register_new_parameter(module: nn.Module, name: str, parameter: nn.Parameter) -> None:
    """``setattr(module, name, parameter)`` for a new Parameter taking the place
    of a registered None (a layer without a bias), written straight into
    ``module._parameters`` where that is all nn.Module's ``__setattr__`` would
    do: the class keeps torch's ``__setattr__`` and ``register_parameter`` (as
    this module found it: a library may patch nn.Module's, as accelerate's
    ``init_empty_weights`` does), no other registry or the instance dict holds
    the name, and no global parameter registration hook is there to see it.
    ``__setattr__`` and ``register_parameter`` cost several microseconds per
    call, which a fold of many blocks pays for every bias."""
    hooks = getattr(_torch_module, "_global_parameter_registration_hooks", None)
    parameters = module._parameters
    klass = type(module)
    if klass.__setattr__ is nn.Module.__setattr__ and klass.register_parameter is _REGISTER_PARAMETER and \
            hooks is not None and not hooks and \
            type(parameter) is nn.Parameter and parameter.grad_fn is None and name in parameters and \
            parameters[name] is None and name not in module.__dict__ and name not in module._buffers and \
            name not in module._modules and name not in module._non_persistent_buffers_set:
        parameters[name] = parameter
    else:
        setattr(module, name, parameter)


def set_plain_attribute(module: nn.Module, name: str, value: object) -> None:
    """``setattr(module, name, value)`` for a value that is neither a tensor nor a
    module (a bound method, a flag), made by ``object.__setattr__`` where that
    is all nn.Module's ``__setattr__`` would do: the class keeps torch's
    ``__setattr__`` and no registry holds the name. nn.Module's own asks
    whether the value is a Parameter or a Buffer through their metaclasses'
    Python ``__instancecheck__``, several microseconds a call."""
    if type(module).__setattr__ is nn.Module.__setattr__ and not isinstance(value, (torch.Tensor, nn.Module)) and \
            name not in module._parameters and name not in module._modules and name not in module._buffers:
        object.__setattr__(module, name, value)
    else:
        setattr(module, name, value)


def has_own_forward(module: nn.Module) -> bool:
    """Whether the layer runs a forward other than torch's own (even one proven a plain conv)."""
    return _forward_owner(module) not in _STANDARD_LAYER_FORWARDS


def why_layer_cannot_change(module: nn.Module, *, own_forward: bool = False) -> str | None:
    """Why folding into this layer could change what it computes, or None if it can be folded.

    With ``own_forward``, a layer whose own forward is provably a plain conv or
    linear (:mod:`fusedconv.dataflow.layer_forward`) qualifies too: right for a
    BN folded *after* it, not for merging branches into it (a "same" padding
    computed on the fly is not the fixed padding the branches line up with)."""
    owner = _forward_owner(module)
    proven: frozenset[str] = frozenset()
    if owner not in _STANDARD_LAYER_FORWARDS:
        if not own_forward:
            return f"{type(module).__name__} has its own forward ({owner}), which may not use its weight as is"
        # The proof reads code with the dataflow's tools, which import this module.
        from .dataflow.layer_forward import why_forward_is_not_a_plain_conv

        unproven = why_forward_is_not_a_plain_conv(module)
        if unproven:
            return f"{type(module).__name__} has its own forward ({owner}), which may not use its weight as is: {unproven}"
        proven = frozenset({"forward"})
    # parametrize registers its ModuleDict as a submodule; asking is_parametrized
    # only then spares a plain layer the AttributeError of a failed getattr.
    if "parametrizations" in module._modules and parametrize.is_parametrized(module):
        return "its weight is computed by a parametrization (torch.nn.utils.parametrize)"
    problem = why_not_standard(module, proven)
    if problem:
        return f"{type(module).__name__} is not a standard layer: {problem}"
    if distributed.has_other_forward_hooks(module):  # FSDP2's own gather the weight, as it is, for the forward
        return "it has forward hooks (weight_norm, pruning or user hooks may rewrite its weight or output)"
    problem = distributed.why_fsdp_stops_fold(module)
    if problem:
        return problem
    if isinstance(registered_attribute(module, "weight"), nn.parameter.UninitializedParameter):
        return "it is a lazy module whose weight is not initialised yet (run a forward first)"
    return None


# --------------------------------------------------------------------------- batch norms


@dataclass(frozen=True)
class BatchNormKind:
    """A family of BatchNorm-like modules fusedconv knows how to fold.

    ``forwards`` are the qualified names of the ``forward`` implementations that
    compute ``act(drop(batch_norm(x)))`` with the module's running statistics in
    eval mode; ``replacement`` builds what stands in the module's place once its
    affine part has been folded away; ``passes_through`` says that the
    replacement is the identity, so the BN's output is the affine map itself
    (needed to fold a BN into a layer after it, or two BNs in a row);
    ``frozen`` modules use their running statistics even in training mode.
    """

    name: str
    forwards: frozenset[str]
    replacement: Callable[[nn.Module], nn.Module]
    passes_through: bool
    frozen: bool = False

    def passes(self, bn: nn.Module) -> bool:
        """Whether this BN, once folded, is the identity: always for plain BNs,
        and for timm's BatchNormAct when its activation and drop are identities
        (``apply_act=False``, e.g. MaxViT's ``pre_norm``)."""
        return self.passes_through or isinstance(self.replacement(bn), nn.Identity)


def _identity(_: nn.Module) -> nn.Module:
    return nn.Identity()


def _activation_of(module: nn.Module) -> nn.Module:
    parts = [m for m in (module.drop, module.act) if not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


BATCHNORM_KINDS = (
    BatchNormKind(
        "torch BatchNorm",
        frozenset({"torch.nn.modules.batchnorm._BatchNorm", "torch.nn.modules.batchnorm.SyncBatchNorm"}),
        _identity,
        passes_through=True,
    ),
    BatchNormKind(
        "FrozenBatchNorm2d",
        frozenset({"torchvision.ops.misc.FrozenBatchNorm2d"}),
        _identity,
        passes_through=True,
        frozen=True,
    ),
    BatchNormKind(
        "timm BatchNormAct",
        frozenset({"timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct"}),
        _activation_of,
        passes_through=False,
    ),
    BatchNormKind(
        "timm FrozenBatchNormAct2d",
        frozenset({"timm.layers.norm_act.FrozenBatchNormAct2d"}),
        _activation_of,
        passes_through=False,
        frozen=True,
    ),
)


_BATCHNORM_FORWARDS = frozenset().union(*(kind.forwards for kind in BATCHNORM_KINDS))


def batchnorm_kind(module: nn.Module) -> BatchNormKind | None:
    """The BatchNorm family a module belongs to, or None if it is not a BN we can
    fold (an unknown forward, or a standard one that :func:`why_not_standard` flags)."""
    owner = _forward_owner(module)
    for kind in BATCHNORM_KINDS:
        if owner in kind.forwards:
            return kind if why_not_standard(module) is None else None
    return None


def is_batchnorm_like(module: nn.Module) -> bool:
    """Whether ``module`` normalises like a BatchNorm: any ``_BatchNorm``, or a
    module whose forward is one of a known family's (foldable or not)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return _forward_owner(module) in _BATCHNORM_FORWARDS


def has_running_stats(bn: nn.Module) -> bool:
    return isinstance(registered_attribute(bn, "running_mean"), torch.Tensor) and isinstance(
        registered_attribute(bn, "running_var"), torch.Tensor
    )


def num_features(bn: nn.Module) -> int:
    """Channels of a BN with running statistics."""
    return registered_attribute(bn, "running_mean").numel()


def bn_statistics(bn: nn.Module, name: str) -> BatchNormStats:
    """What an eval-mode BN with running statistics reads, labelled ``name`` for error messages."""
    weight = registered_attribute(bn, "weight")
    bias = registered_attribute(bn, "bias")
    return BatchNormStats(
        registered_attribute(bn, "running_mean"),
        registered_attribute(bn, "running_var"),
        weight if isinstance(weight, torch.Tensor) else None,
        bias if isinstance(bias, torch.Tensor) else None,
        float(bn.eps),
        name,
    )


def why_batchnorm_cannot_fold(bn: nn.Module) -> str | None:
    """Why this BN cannot be folded (other than where it sits), or None."""
    if not has_running_stats(bn):
        return "track_running_stats=False: it normalises with batch statistics, which no weight can hold"
    if distributed.original_class(bn) is not None:
        return ("fully_shard was applied to it: FSDP2 would go on managing its parameters and hooks once it is "
                "replaced (apply fully_shard to the block that holds it instead)")
    if bn._forward_pre_hooks or bn._forward_hooks:
        return "it has forward hooks"
    return None


def check_not_training(module: nn.Module, name: str) -> None:
    """Raise :class:`FoldError` if a BatchNorm is in training mode (and would
    therefore normalise with batch statistics)."""
    if not module.training:
        return
    kind = batchnorm_kind(module)
    if not (kind is not None and kind.frozen):
        raise FoldError(
            f"{name or 'model'} ({type(module).__name__}) is in training mode, where BatchNorm uses batch "
            "statistics: call model.eval() before folding"
        )


def count_batchnorms(model: nn.Module) -> int:
    """Number of BatchNorm-like modules (any family fusedconv knows, plus any other
    ``_BatchNorm`` subclass) in ``model``; in a TorchScript module, those whose
    original class name says BatchNorm."""
    if isinstance(model, torch.jit.ScriptModule):
        return sum(1 for m in model.modules() if "BatchNorm" in getattr(m, "original_name", ""))
    return sum(1 for m in model.modules() if is_batchnorm_like(m))
