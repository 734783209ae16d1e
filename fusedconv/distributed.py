"""Recognising what ``torch.distributed`` puts in a model: DTensors and their
local blocks, and the classes, hooks and state of FSDP2.

A **DTensor** parameter (FSDP2, ``distribute_module``/``distribute_tensor``,
tensor-parallel plans) is a global tensor of which each rank holds one block,
its local tensor; :func:`local_block` says which, from the placements.

**FSDP2**: ``fully_shard(module)`` changes three things that fusedconv's checks would
otherwise take for user code:

* the module's class becomes a class that FSDP creates, ``FSDP<Class>``, with
  bases ``(FSDPModule, Class)``: its methods manage the parameters (``reshard``,
  ``unshard``, ``_apply``...), none of them is reached by the forward, which
  is the original class's;
* a forward pre-hook and a forward hook (bound methods of the module's
  ``FSDPState``) all-gather the parameters before the forward and free the
  gathered copies after it; with a mixed-precision policy they also cast the
  input and output, which is rounding, not a change of what is computed;
* the module's ``__dict__`` holds the composable-API state (the ``FSDPState``,
  which refers to every module whose parameters it manages, only to set their
  parameters, never to call them).

Each is recognised exactly (the very class FSDP made for this original class,
the very hook functions bound to the module's own state), so that a look-alike
is still treated as user code. Nothing here imports FSDP: a model can hold
FSDP's classes (or DTensors) only once FSDP (or DTensor) has been imported.

FSDP2 keeps the parameters it was given at ``fully_shard`` time in parameter
groups (``FSDPParamGroup``, one ``FSDPParam`` per parameter). A fold that gives
a managed layer a bias adds it to the group of the layer's weight
(:class:`NewFsdpBiases`), through FSDP2 internals that are checked before the
fold plans on them (:func:`why_no_new_bias`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import FoldError
from .walking import submodules

_DTENSOR = "torch.distributed.tensor"
_FULLY_SHARD = "torch.distributed.fsdp._fully_shard._fully_shard"
_FSDP_STATE = "torch.distributed.fsdp._fully_shard._fsdp_state"
_FSDP_PARAM = "torch.distributed.fsdp._fully_shard._fsdp_param"
_FSDP_COMMON = "torch.distributed.fsdp._fully_shard._fsdp_common"
_COMPOSABLE_STATE = "torch.distributed._composable_state"
_CONTRACT = "torch.distributed._composable.contract"
_PARALLEL_STYLE = "torch.distributed.tensor.parallel.style"
# What type(name, bases, dct) puts in FSDP's generated class besides FSDP's own __deepcopy__.
_GENERATED_CLASS_NAMES = frozenset({"__module__", "__doc__", "__deepcopy__"})


def original_class(module: nn.Module) -> type | None:
    """The class ``fully_shard`` replaced, when ``type(module)`` is exactly the
    class FSDP2 generated for it (``FSDP<Class>``); None for any other class."""
    fully_shard = sys.modules.get(_FULLY_SHARD)
    cls = type(module)
    if fully_shard is None or not issubclass(cls, fully_shard.FSDPModule):
        return None
    bases = cls.__bases__
    if len(bases) != 2 or bases[0] is not fully_shard.FSDPModule:
        return None
    original = bases[1]
    if fully_shard.get_cls_to_fsdp_cls().get(original) is not cls:
        return None
    defined = vars(cls)
    if defined.keys() != _GENERATED_CLASS_NAMES or defined["__deepcopy__"] is not fully_shard._unimplemented_deepcopy:
        return None
    return original


def fsdp_module_class() -> type | None:
    """``FSDPModule``, once FSDP2 has been imported (None before)."""
    fully_shard = sys.modules.get(_FULLY_SHARD)
    return None if fully_shard is None else fully_shard.FSDPModule


def _state(module: nn.Module) -> object | None:
    """The module's own ``FSDPState``, when FSDP2 swapped its class."""
    if original_class(module) is None:
        return None
    return sys.modules[_FULLY_SHARD].fully_shard.state(module)


def _is_bound_to(hook: object, state: object, method: str) -> bool:
    """Whether ``hook`` is FSDPState's own ``method`` bound to ``state``."""
    fsdp_state = sys.modules[_FSDP_STATE].FSDPState
    return isinstance(hook, types.MethodType) and hook.__self__ is state and hook.__func__ is vars(fsdp_state)[method]


def own_forward_hooks(module: nn.Module) -> tuple[set[int], set[int]]:
    """Keys of the module's forward pre-hooks and forward hooks that are FSDP2's
    own: its state's ``_pre_forward`` and ``_post_forward`` (a ``fully_shard``
    of a list of modules wraps them in closures, which are not recognised)."""
    state = _state(module)
    if state is None:
        return set(), set()
    pre = {key for key, hook in module._forward_pre_hooks.items() if _is_bound_to(hook, state, "_pre_forward")}
    post = {key for key, hook in module._forward_hooks.items() if _is_bound_to(hook, state, "_post_forward")}
    return pre, post


def has_other_forward_hooks(module: nn.Module) -> bool:
    """Whether the module has forward hooks besides FSDP2's own and those of a
    tensor-parallel plan that only move values between ranks
    (:func:`_is_tensor_parallel_hook`)."""
    if not (module._forward_pre_hooks or module._forward_hooks):
        return False
    pre, post = own_forward_hooks(module)
    other_pre = {key for key, hook in module._forward_pre_hooks.items()
                 if key not in pre and not _is_tensor_parallel_hook(hook, output=False)}
    other_post = {key for key, hook in module._forward_hooks.items()
                  if key not in post and not _is_tensor_parallel_hook(hook, output=True)}
    return bool(other_pre or other_post)


# The tensor-parallel styles whose hooks only redistribute a Linear's input and
# output (torch.distributed.tensor.parallel.style: they support nn.Linear alone).
_TENSOR_PARALLEL_STYLES = ("ColwiseParallel", "RowwiseParallel")


def _is_tensor_parallel_hook(hook: object, *, output: bool) -> bool:
    """Whether ``hook`` is one that ``parallelize_module`` registered for
    ``ColwiseParallel`` or ``RowwiseParallel``: one of ``distribute_module``'s
    own lambdas calling the style's ``_prepare_input_fn`` (which annotates and
    redistributes the input: the values stay) or ``_prepare_output_fn`` with
    every output placement ``Replicate`` (the output is whole on every rank: a
    redistribution, or the reduction of partial sums that completes the
    layer's own sum). An output left sharded is a slice of the layer's output,
    which a BN after it does not see whole: such a hook is not recognised."""
    code = getattr(hook, "__code__", None)
    api, style = sys.modules.get("torch.distributed.tensor._api"), sys.modules.get(_PARALLEL_STYLE)
    if code is None or api is None or style is None or code.co_filename != api.__file__ \
            or code.co_name != "<lambda>":
        return False
    cells = dict(zip(code.co_freevars, hook.__closure__ or ()))
    cell = cells.get("output_fn" if output else "input_fn")
    prepared = cell.cell_contents if cell is not None else None
    if not isinstance(prepared, functools.partial):
        return False
    method = "_prepare_output_fn" if output else "_prepare_input_fn"
    if not any(prepared.func is vars(getattr(style, name))[method].__func__ for name in _TENSOR_PARALLEL_STYLES):
        return False
    if not output:
        return True
    layouts = prepared.args[0] if prepared.args else ()
    replicate = sys.modules[_DTENSOR].Replicate
    return bool(layouts) and all(type(placement) is replicate for placement in layouts)


def own_attributes(module: nn.Module) -> list[object]:
    """The values in the module's ``__dict__`` that are FSDP2's bookkeeping: the
    composable-API state and registry, when ``fully_shard`` is all they hold."""
    state = _state(module)
    if state is None:
        return []
    contract = sys.modules[_CONTRACT]
    attributes = vars(module)
    states, registry = attributes.get(contract.STATE_KEY), attributes.get(contract.REGISTRY_KEY)
    own = []
    if isinstance(states, dict) and list(states.values()) == [state]:
        own.append(states)
    if isinstance(registry, dict) and list(registry) == ["fully_shard"]:
        own.append(registry)
    return own


def managed_by_fsdp(module: nn.Module) -> bool:
    """Whether FSDP2 manages the module's parameters (``fully_shard`` on it or on
    a module above it): FSDP2 gathers, casts and reduces only the parameters in
    its groups, so a parameter the module gains must join one
    (:class:`NewFsdpBiases`)."""
    return vars(module).get("_is_fsdp_managed_module", False) is True


# FSDPParam's constructor as NewFsdpBiases calls it: any other signature is another
# FSDP2, whose layers keep their BN rather than meet a call written for this one.
_FSDP_PARAM_ARGUMENTS = ("param", "module_info", "mesh_info", "post_forward_mesh_info", "device",
                         "shard_placement_fn", "mp_policy", "offload_policy")
# What NewFsdpBiases reads of the parameter group of the layer's weight.
_PARAM_GROUP_ATTRIBUTES = ("fsdp_params", "mesh_info", "post_forward_mesh_info", "device", "mp_policy",
                           "offload_policy")


def _why_fsdp_internals_unknown() -> str | None:
    """Why this torch's FSDP2 lacks an internal that finding a weight's parameter
    group (:func:`fsdp_hold`) or adding a bias to it (:class:`NewFsdpBiases`)
    relies on, or None. Names and the constructor's parameters are checked, so
    that another torch version refuses the fold rather than fail in it."""
    param_module = sys.modules.get(_FSDP_PARAM)
    internals = {
        "_composable_state._module_state_mapping": getattr(sys.modules.get(_COMPOSABLE_STATE),
                                                           "_module_state_mapping", None),
        "FSDPParam": getattr(param_module, "FSDPParam", None),
        "ParamModuleInfo": getattr(param_module, "ParamModuleInfo", None),
        "TrainingState.IDLE": getattr(getattr(sys.modules.get(_FSDP_COMMON), "TrainingState", None), "IDLE", None),
    }
    missing = [name for name, value in internals.items() if value is None]
    if missing:
        return f"it has no {missing[0]}"
    if not isinstance(internals["_composable_state._module_state_mapping"], Mapping):
        return "its _composable_state._module_state_mapping is not a mapping of modules to states"
    return _why_classes_unknown(internals["FSDPParam"], internals["ParamModuleInfo"])


@functools.lru_cache(maxsize=8)  # inspect.signature is slow, and every layer without a bias asks
def _why_classes_unknown(fsdp_param: type, module_info: type) -> str | None:
    """Why FSDPParam's constructor or ParamModuleInfo's fields are not the ones
    :class:`NewFsdpBiases` calls, or None."""
    arguments = tuple(inspect.signature(fsdp_param.__init__).parameters)[1:]
    if arguments != _FSDP_PARAM_ARGUMENTS:
        return f"its FSDPParam takes ({', '.join(arguments)}), not ({', '.join(_FSDP_PARAM_ARGUMENTS)})"
    if not callable(getattr(fsdp_param, "init_dtype_attrs", None)):
        return "its FSDPParam has no init_dtype_attrs"
    if not dataclasses.is_dataclass(module_info) or \
            [field.name for field in dataclasses.fields(module_info)][:2] != ["module", "param_name"]:
        return "its ParamModuleInfo does not start with (module, param_name)"
    return None


@dataclass(frozen=True)
class FsdpHold:
    """Where FSDP2 holds one of a layer's parameters: its ``FSDPParam`` and the
    ``FSDPParamGroup`` that gathers and reduces it."""

    param: object
    group: object


def _param_groups(state: object) -> list:
    """An FSDP2 state's parameter groups: a list since per-parameter meshes
    (``_fsdp_param_groups``), one group or None before (``_fsdp_param_group``)."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


def fsdp_hold(layer: nn.Module, name: str = "weight") -> FsdpHold | None:
    """Where FSDP2 holds ``layer``'s parameter ``name``, or None when no one
    parameter group of a live FSDP2 state holds it (an ``ignored_params``
    weight, say). A layer does not know the module that ``fully_shard`` was
    applied to above it, so the FSDP2 states are searched
    (:func:`_search_fsdp_params`), once for all the layers they hold: each
    layer asks a few times per fold. Call only once
    :func:`_why_fsdp_internals_unknown` has found nothing."""
    found = _held(layer, name)
    if found is None:
        _search_fsdp_params()
        found = _held(layer, name)
    return found


# What the last search found: for each layer, each of its parameters that one FSDP2
# parameter group holds, with that FSDPParam and group, weakly (the cache must not
# keep a model alive).
_fsdp_params_of: "weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[weakref.ref, weakref.ref]]]" = \
    weakref.WeakKeyDictionary()


def _held(layer: nn.Module, name: str) -> FsdpHold | None:
    """The last search's answer for ``layer.<name>``, if its FSDPParam and group
    are alive and the FSDPParam is still the one of that parameter."""
    references = _fsdp_params_of.get(layer, {}).get(name)
    if references is None:
        return None
    param, group = references[0](), references[1]()
    if param is None or group is None:
        return None
    info = param._module_info
    return FsdpHold(param, group) if info.module is layer and info.param_name == name else None


def _search_fsdp_params() -> None:
    """Record in ``_fsdp_params_of`` the parameter group of every parameter that
    one group of a live FSDP2 state holds (FSDP's registry of states: one per
    ``fully_shard`` call); a parameter found in two groups has no one group."""
    registry = sys.modules[_COMPOSABLE_STATE]._module_state_mapping
    fsdp_state = sys.modules[_FSDP_STATE].FSDPState
    states = {id(state): state for state in (reference() for reference in list(registry.values()))
              if isinstance(state, fsdp_state)}
    found: dict[tuple[int, str], tuple[nn.Module, str, list[tuple[object, object]]]] = {}
    for state in states.values():
        for group in _param_groups(state):
            for param in getattr(group, "fsdp_params", ()):
                info = getattr(param, "_module_info", None)
                layer, name = getattr(info, "module", None), getattr(info, "param_name", None)
                if isinstance(layer, nn.Module) and isinstance(name, str):
                    found.setdefault((id(layer), name), (layer, name, []))[2].append((param, group))
    for layer, name, holders in found.values():
        held = _fsdp_params_of.setdefault(layer, {})
        if len(holders) == 1:
            held[name] = (weakref.ref(holders[0][0]), weakref.ref(holders[0][1]))
        else:
            held.pop(name, None)


def _why_fsdp_group_cannot_take_bias(layer: nn.Module) -> str | None:
    """Why the bias a fold gives ``layer``, which FSDP2 manages, cannot join the
    FSDP2 parameter group of its weight, or None."""
    unknown = _why_fsdp_internals_unknown()
    if unknown:
        return f"this torch's FSDP2 is not the one fusedconv adds a parameter to ({unknown})"
    weight = fsdp_hold(layer)
    if weight is None:
        return "fusedconv finds its weight in no single FSDP2 parameter group, which the new bias would join"
    group = weight.group
    missing = [name for name in _PARAM_GROUP_ATTRIBUTES if not hasattr(group, name)]
    if missing:
        return f"this torch's FSDP2 parameter group has no {missing[0]}, which fusedconv reads to add the new bias"
    sharded = getattr(weight.param, "sharded_param", None)
    if not (is_dtensor(sharded) and sharded.device_mesh == getattr(group.mesh_info, "mesh", None)):
        return ("its weight is not split by FSDP2 alone over its group's mesh (tensor parallelism, a mesh of its "
                "own), where the new bias would be")
    return None


def why_fsdp_holds_gathered(layer: nn.Module) -> str | None:
    """Why FSDP2 may still hold ``layer``'s parameters gathered when a fold writes
    them, or None.

    A fold writes FSDP2's sharded parameters (DTensors): :func:`fusedconv.fuse`
    reshards FSDP2's modules first, and the gathered copies a forward leaves
    are dropped at the next reshard. In the middle of a forward or backward a
    group cannot be resharded, and a fold would write copies about to be
    dropped while the BNs are gone for good. So each of the layer's parameters
    that is not a DTensor must be one that FSDP2 does not hold
    (``ignored_params``: a plain tensor, whole on every rank) or one whose
    group is idle (gathered after a forward: the reshard shards it). Where
    fusedconv cannot see which (another torch's FSDP2; no parameter of the
    layer sharded and none found in a group), the BN is left."""
    if not managed_by_fsdp(layer):
        return None
    tensors = {name: getattr(layer, name, None) for name in ("weight", "bias")}
    plain = [name for name, tensor in tensors.items() if isinstance(tensor, torch.Tensor) and not is_dtensor(tensor)]
    if not plain:
        return None
    unknown = _why_fsdp_internals_unknown()
    holds = [] if unknown else [hold for hold in (fsdp_hold(layer, name) for name in plain) if hold is not None]
    if unknown or not (holds or any(is_dtensor(tensor) for tensor in tensors.values())):
        why = f"this torch's FSDP2 is not the one it knows ({unknown})" if unknown else \
            "it finds none of them in an FSDP2 parameter group"
        return (f"FSDP2 holds its parameters gathered, and fusedconv cannot tell whether in the middle of a "
                f"forward or backward, where its group cannot be resharded before the fold writes it: {why}; fold "
                "outside the forward and backward")
    idle = sys.modules[_FSDP_COMMON].TrainingState.IDLE
    if all(getattr(hold.group, "_training_state", None) is idle for hold in holds):
        return None
    return ("FSDP2 holds its parameters gathered, in the middle of a forward or backward, where its FSDP2 group "
            "cannot be resharded before the fold writes it: fold outside the forward and backward")


def why_fsdp_stops_fold(layer: nn.Module) -> str | None:
    """Why FSDP2's hold on ``layer`` stops a fold into it now, or None: its
    parameters held gathered mid-forward (:func:`why_fsdp_holds_gathered`), or
    a new bias that its FSDP2 group cannot take (:func:`why_no_new_bias`)."""
    return why_fsdp_holds_gathered(layer) or why_no_new_bias(layer)


def why_no_new_bias(layer: nn.Module) -> str | None:
    """Why a fold cannot give ``layer`` a bias it lacks, or None.

    A layer that FSDP2 manages gets its new bias as a parameter of the FSDP2
    parameter group of its weight, so that FSDP2 shards, gathers, casts (mixed
    precision), reduces (gradients) and saves it like the weight; a plain
    tensor would be none of these. Adding it relies on FSDP2 internals
    (``FSDPParam``, ``FSDPParamGroup``, the registry of FSDP2 states), checked
    here by name and signature: on another torch, with no group found for the
    weight, or a weight that another parallelism splits too, the BN is left
    with the reason.
    """
    if layer.bias is not None or not managed_by_fsdp(layer):
        return None
    problem = _why_fsdp_group_cannot_take_bias(layer)
    if problem:
        return (f"FSDP2 (fully_shard) manages its parameters and the bias a fold gives it cannot join FSDP2's "
                f"parameter group: {problem}; build it with bias=True, or fold before fully_shard")
    return None


def fsdp_bias_placements(weight: torch.Tensor) -> tuple:
    """The placements FSDP2 gives a new bias in the group of ``weight`` (FSDP2's
    sharded DTensor, placed as Shard and Replicate): FSDP2 splits a parameter
    along dim 0 (the new bias gets no ``shard_placement_fn``) over each mesh dim
    where it splits the weight, along whichever dim of the weight."""
    module = sys.modules[_DTENSOR]
    return tuple(module.Shard(0) if placement.is_shard() else module.Replicate() for placement in weight.placements)


class NewFsdpBiases:
    """Gives layers that FSDP2 manages new biases (:meth:`add`), each a parameter
    of the FSDP2 parameter group of the layer's weight.

    Used as a context manager around the writes: an exception takes every bias
    added back out of its group, with the hook FSDP2 put on its layer (the
    layer's ``bias`` attribute is the caller's to undo, :meth:`add`).
    """

    def __init__(self):
        self._added: list[tuple[object, object, nn.Module, list]] = []  # group, FSDPParam, layer, hook keys

    def add(self, layer: nn.Module, weight: FsdpHold, channels: int) -> nn.Parameter:
        """A new bias of ``channels`` for ``layer``, registered with ``weight.group``;
        returns the sharded bias (a DTensor Parameter, like the weight's, whose
        local tensor FSDP2 gathers), for the caller to write the channels this
        rank holds and to register as ``layer.bias``.

        FSDPParam takes the whole parameter, the same shape on every rank, and
        keeps its own chunk (zero-padded as FSDP2 pads), placed as
        :func:`fsdp_bias_placements` says; the chunk is written afterwards,
        like any DTensor bias, so no rank needs the whole values. Its dtype
        attributes are set as the group's lazy initialisation sets them, in
        case it has run (it sets them again if not). Every rank adds the same
        biases in the same order.
        """
        fsdp_param = sys.modules[_FSDP_PARAM]
        group, sharded_weight = weight.group, weight.param.sharded_param
        hooks = layer._load_state_dict_post_hooks
        known_hooks = set(hooks)
        whole = nn.Parameter(torch.empty(channels, dtype=sharded_weight.dtype, device=group.device),
                             requires_grad=sharded_weight.requires_grad)
        # FSDPParam registers the sharded bias (and a load hook) on the layer itself, before it may
        # still fail: the bias is taken off again either way, so that the caller registers it and
        # records "no bias" as what to restore should the fold fail.
        try:
            bias = fsdp_param.FSDPParam(whole, fsdp_param.ParamModuleInfo(layer, "bias"), group.mesh_info,
                                        group.post_forward_mesh_info, group.device, None, group.mp_policy,
                                        group.offload_policy)
        except BaseException:
            layer._parameters["bias"] = None
            for key in [key for key in hooks if key not in known_hooks]:
                hooks.pop(key)
            raise
        layer._parameters["bias"] = None
        new_hooks = [key for key in hooks if key not in known_hooks]
        group.fsdp_params.append(bias)
        self._added.append((group, bias, layer, new_hooks))
        bias.init_dtype_attrs(group.mp_policy)
        weight_name = getattr(weight.param, "_param_fqn", None)  # set by the lazy initialisation, for messages
        if weight_name is not None:
            bias._param_fqn = weight_name.removesuffix("weight") + "bias"
        return bias.sharded_param

    def __enter__(self) -> "NewFsdpBiases":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        """On an error, undo every :meth:`add` (the error propagates)."""
        if error is not None:
            for group, bias, layer, hook_keys in reversed(self._added):
                group.fsdp_params.remove(bias)
                for key in hook_keys:
                    layer._load_state_dict_post_hooks.pop(key, None)
        return False


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to."""
    fsdp_module = fsdp_module_class()
    return [] if fsdp_module is None else [m for m in model.modules() if isinstance(m, fsdp_module)]


# --------------------------------------------------------------------------- DTensors


def dtensor_class() -> type | None:
    """``DTensor``, once it has been imported (None before: no tensor can be one)."""
    module = sys.modules.get(_DTENSOR)
    return None if module is None else module.DTensor


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (a ``torch.distributed.tensor.DTensor``)."""
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``tensor``: a DTensor's local tensor (the memory that
    every view and write of it reaches), any other tensor itself."""
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:  # most tensors: no lookup of DTensor
        return tensor
    return tensor._local_tensor if is_dtensor(tensor) else tensor


DTENSOR_REFUSAL = ("it is a DTensor (sharded, e.g. by FSDP2): fold the model in place with "
                   "fusedconv.fuse(model, inplace=True), called on every rank")


def is_sharded(model: object) -> bool:
    """Whether ``model`` is a module holding DTensors or modules that ``fully_shard``
    was applied to (:func:`any_sharded`)."""
    if dtensor_class() is None and fsdp_module_class() is None:
        return False  # neither is imported, so nothing can be sharded: no walk (every fold asks first)
    return isinstance(model, nn.Module) and any_sharded(submodules(model))  # a list: no generator per level


def any_sharded(modules: Iterable[nn.Module]) -> bool:
    """Whether any of ``modules`` holds a DTensor parameter or buffer, or was
    sharded by ``fully_shard`` (whose parameters are plain tensors while they
    are unsharded). One look at each module's registries: every fold asks."""
    modules = list(modules)
    return sharded_among(modules, (tensor for module in modules for registry in (module._parameters, module._buffers)
                                   for tensor in registry.values()))


def sharded_among(modules: Sequence[nn.Module], tensors: Iterable[torch.Tensor]) -> bool:
    """:func:`any_sharded` for a caller that has gathered the modules' registered
    tensors on its own walk: a model's few distinct classes are checked, not
    each module and tensor, and nothing at all before DTensor or FSDP2 is
    imported (no tensor can be one then)."""
    dtensor, fsdp_module = dtensor_class(), fsdp_module_class()
    if dtensor is None and fsdp_module is None:
        return False
    if fsdp_module is not None and any(issubclass(kind, fsdp_module) for kind in {type(m) for m in modules}):
        return True
    return dtensor is not None and any(issubclass(kind, dtensor) for kind in {type(t) for t in tensors})


def _understood(placement: object) -> bool:
    """Shard and Replicate, exactly: a subclass such as ``_StridedShard`` (FSDP with
    tensor parallelism) interleaves blocks, and ``Partial`` holds addends, not values."""
    module = sys.modules[_DTENSOR]
    return type(placement) is module.Shard or type(placement) is module.Replicate


def why_placements_not_understood(tensor: torch.Tensor) -> str | None:
    """Why fusedconv cannot tell which elements of ``tensor`` this rank holds, or None."""
    if not is_dtensor(tensor):
        return None
    strange = [placement for placement in tensor.placements if not _understood(placement)]
    if strange:
        return (f"it is a DTensor placed as {tensor.placements}: fusedconv folds Shard and Replicate placements "
                f"only, not {strange[0]}")
    if tensor.device_mesh.get_coordinate() is None:
        return "it is a DTensor on a device mesh that this rank is not part of"
    return None


@dataclass(frozen=True)
class Block:
    """The block of a global tensor that this rank holds: per dim, its first index and size."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def span(self, dim: int) -> range:
        return range(self.offsets[dim], self.offsets[dim] + self.sizes[dim])


def placed_block(shape: tuple[int, ...], mesh: object, placements: tuple) -> Block:
    """The block of a tensor of ``shape`` placed on ``mesh`` as ``placements`` that
    this rank holds: torch.chunk's rule along each sharded dim, nested across mesh dims."""
    return _placed_block(tuple(shape), mesh, tuple(placements), mesh.get_coordinate())


# torch's computation is slow, and a model's layers share a few shapes; the rank's
# coordinate in the mesh is part of the key, as the block depends on it.
@functools.lru_cache(maxsize=1024)
def _placed_block(shape: tuple[int, ...], mesh: object, placements: tuple, coordinate: tuple | None) -> Block:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sizes, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    return Block(tuple(offsets), tuple(sizes))


def local_block(tensor: torch.Tensor, name: str) -> Block:
    """Which block of ``tensor`` this rank holds: all of it for a plain tensor, what
    its placements give for a DTensor (:func:`placed_block`). Raises
    :class:`FoldError` naming ``name`` for placements that are not understood,
    or a local tensor of another shape than the placements give."""
    if not is_dtensor(tensor):
        return Block((0,) * tensor.dim(), tuple(tensor.shape))
    problem = why_placements_not_understood(tensor)
    if problem:
        raise FoldError(f"{name}: {problem}")
    block = placed_block(tuple(tensor.shape), tensor.device_mesh, tensor.placements)
    if block.sizes != tuple(tensor._local_tensor.shape):
        raise FoldError(f"{name}: its local tensor has shape {tuple(tensor._local_tensor.shape)}, but its placements "
                        f"{tensor.placements} give this rank a block of shape {block.sizes}")
    return block


def channel_placements(tensor: torch.Tensor, channel_dim: int) -> tuple[str, ...] | None:
    """Per mesh dim, whether ``tensor`` (placed as Shard and Replicate only) is
    split along ``channel_dim`` there (``"shard"``) or not split at all
    (``"replicate"``); None when it is split along another dim. A plain tensor
    has no mesh dims. Two tensors with the same answer on the same mesh hold the
    same channels on every rank (both follow torch.chunk's rule)."""
    if not is_dtensor(tensor):
        return ()
    kinds = []
    for placement in tensor.placements:
        if placement.is_shard() and placement.dim != channel_dim:
            return None
        kinds.append("shard" if placement.is_shard() else "replicate")
    return tuple(kinds)


def why_input_sum_not_local(layer: nn.Module) -> str | None:
    """Why this rank cannot compute, from what it holds, the bias that a BN
    *before* the Conv/Linear ``layer`` adds, or None.

    That bias sums the weight over every input channel and tap
    (``sum_{i,k} W[o, i, k] * shift[i]``) for each output channel whose bias
    the rank holds; doing it without gathering weights needs those whole rows
    of the weight on the rank. Decided from the placements alone, so every
    rank gives the same answer.
    """
    weight, bias = layer.weight, layer.bias
    if not (is_dtensor(weight) or is_dtensor(bias)):
        return None
    if why_placements_not_understood(weight) or (bias is not None and why_placements_not_understood(bias)):
        return None  # not a place to leave the BN: folding refuses such placements with a FoldError
    weight_rows = channel_placements(weight, 0)
    if weight_rows is None:
        return (f"its weight is placed as {weight.placements}: a BN before it adds a bias that sums the weight over "
                "every input channel, which would need the weight's columns gathered")
    if bias is None or set(weight_rows) <= {"replicate"}:
        return None  # a new bias is placed like the weight's rows; a replicated weight has every row
    bias_rows = channel_placements(bias, 0)
    if not (is_dtensor(bias) and bias.device_mesh == weight.device_mesh and bias_rows == weight_rows):
        where = bias.placements if is_dtensor(bias) else "a plain tensor on every rank"
        return (f"its bias ({where}) is not split like its weight's rows ({weight.placements}): a rank would need "
                "weight rows it does not hold to fold the bias of a BN before it")
    return None
