"""Folding BatchNorms in a ``torch.export`` program.

In an :class:`~torch.export.ExportedProgram` a BatchNorm is not a module but a
node: ``aten.batch_norm`` (as exported) or
``aten._native_batch_norm_legit_no_training`` (after ``run_decompositions()``),
whose statistics and affine parameters are lifted placeholders with values in
the program's state. A BN folds into the layer node before it (``aten.conv1d``
/ ``conv2d`` / ``conv3d``, ``aten.convolution`` including transposed, and
``aten.linear``) by the same rules as for modules (docs/DESIGN.md section 3):

* the layer's output is read by the BN and by nothing else;
* the BN is in inference form (a training batch norm is left, saying so);
* the layer's weight (and bias) are placeholders read by this layer alone and
  sharing no memory with another tensor of the program;
* the layer's output is batched (rank 2 for a Linear, spatial dims + 2 for a
  conv: the node's recorded shape says so);
* a BN *before* a layer folds where that is exact: its output is read by the
  layer alone, as its input; the conv does not pad with zeros and is not
  transposed; no in-place op runs between the two.

The folded weight and bias are computed with the same float64 arithmetic and
checks as :func:`fusedconv.fuse` (one rounding, range checks) into new
tensors: the caller's program is left as it was, and a new program comes back
whose graph has the BN nodes removed, the layer reading the folded tensors (a
new bias placeholder where the layer had none), and the BN's placeholders and
state entries gone. One BN folds per layer node; a Linear decomposed into
``aten.addmm``/``mm`` is left with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections import Counter

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, OutputKind, TensorArgument

from . import kernels
from .affine import BatchNormStats, batchnorm_affines
from .fold import LayerFold, shift_sums
from .fusion_plan import Fold, FusionPlan, Skip
from .memory import sharing_memory
from .writing import check_folded_range

aten = torch.ops.aten
_CONVOLUTIONS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_TRANSPOSED = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_INFERENCE_BATCH_NORMS = {aten._native_batch_norm_legit_no_training.default}
_TRAINING_BATCH_NORMS = {aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_functional.default,
                         aten.native_batch_norm.default}


def _is_layer(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _CONVOLUTIONS or node.target in _TRANSPOSED
                                           or node.target in (aten.convolution.default, aten.linear.default))


def _is_batch_norm(node: fx.Node) -> bool:
    return node.op == "call_function" and "batch_norm" in str(node.target)


def _argument(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class _Program:
    """The values behind an exported program's placeholders, and who reads them."""

    def __init__(self, program: ExportedProgram):
        self.program = program
        self.specs = {spec.arg.name: spec for spec in program.graph_signature.input_specs
                      if isinstance(spec.arg, TensorArgument)}
        entries = []
        for spec in self.specs.values():
            value = self.value_of_spec(spec)
            if value is not None:
                entries.append((spec.arg.name, value))
        self.shared = sharing_memory(entries)

    def value_of_spec(self, spec: InputSpec) -> torch.Tensor | None:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            return self.program.state_dict.get(spec.target, self.program.constants.get(spec.target))
        if spec.kind == InputKind.CONSTANT_TENSOR:
            return self.program.constants.get(spec.target)
        return None

    def value(self, node) -> torch.Tensor | None:
        """The tensor a placeholder node holds (None: a user input, or not a node)."""
        if not isinstance(node, fx.Node) or node.op != "placeholder" or node.name not in self.specs:
            return None
        return self.value_of_spec(self.specs[node.name])

    def is_shared(self, node: fx.Node) -> bool:
        return node.name in self.shared


class _Attributes:
    """The values behind a GraphModule's ``get_attr`` nodes (``ep.module()``, or a
    graph built by hand at the aten level), and which share memory."""

    def __init__(self, module: fx.GraphModule):
        self.module = module
        self.shared = sharing_memory([*module.named_parameters(remove_duplicate=False),
                                      *module.named_buffers(remove_duplicate=False)])
        # Several get_attr nodes may read one tensor: each is a reader.
        self.readers = Counter(node.target for node in module.graph.nodes if node.op == "get_attr")

    def value(self, node) -> torch.Tensor | None:
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        owner, _, name = node.target.rpartition(".")
        try:
            value = getattr(self.module.get_submodule(owner), name)
        except AttributeError:
            return None
        return value if isinstance(value, torch.Tensor) else None

    def is_shared(self, node: fx.Node) -> bool:
        return node.target in self.shared or self.readers[node.target] > 1


def _batch_norm_parts(node: fx.Node):
    """(input, weight, bias, running_mean, running_var, eps, training) of a batch norm node."""
    if node.target == aten.batch_norm.default:
        input_, weight, bias, mean, var, training, _, eps = node.args[:8]
        return input_, weight, bias, mean, var, eps, training
    if node.target in _INFERENCE_BATCH_NORMS:
        input_, weight, bias, mean, var, _, eps = node.args[:7]
        return input_, weight, bias, mean, var, eps, False
    return None


def _bn_output_users(node: fx.Node) -> list[fx.Node] | None:
    """The nodes reading a batch norm's normalised output: for the tuple-returning
    form, the users of its ``[0]`` (None when its statistics outputs are read)."""
    if node.target == aten.batch_norm.default:
        return [node]
    readers = []
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] != 0:
            return None
        readers.append(user)
    return readers


class _Matcher:
    def __init__(self, model: ExportedProgram | fx.GraphModule):
        if isinstance(model, ExportedProgram):
            self.state, self.graph = _Program(model), model.graph_module.graph
        else:
            self.state, self.graph = _Attributes(model), model.graph

    def layer_problem(self, layer: fx.Node) -> str | None:
        weight = layer.args[1]
        if self.state.value(weight) is None:
            return "its weight is not a parameter, buffer or constant of the program"
        bias = _argument(layer, 2, "bias")
        for tensor in (weight, bias):
            if tensor is None:
                continue
            if self.state.value(tensor) is None:
                return "its bias is computed in the graph"
            if len(tensor.users) != 1:
                return f"{tensor.name} is read by {len(tensor.users)} nodes: a fold would change the others"
            if self.state.is_shared(tensor):
                return f"{tensor.name} shares memory with, or is read through, another node of the program"
        return None

    def explain_or_pair(self, bn: fx.Node) -> tuple[fx.Node | None, str | None]:
        """The layer ``bn`` folds into, or why none."""
        if bn.target in _TRAINING_BATCH_NORMS:
            return None, "a batch norm in training form (it normalises with batch statistics)"
        parts = _batch_norm_parts(bn)
        if parts is None:
            return None, f"a batch norm fusedconv does not read ({bn.target})"
        input_, weight, bias, mean, var, _, training = parts
        if training:
            return None, "a batch norm in training mode (it normalises with batch statistics)"
        if self.state.value(mean) is None or self.state.value(var) is None:
            return None, "its running statistics are not tensors of the program"
        for tensor in (weight, bias):
            if tensor is not None and self.state.value(tensor) is None:
                return None, "its affine parameters are computed in the graph"
        if _bn_output_users(bn) is None:
            return None, "its batch statistics outputs are read"
        reader = self._layer_reading(bn)
        if (not isinstance(input_, fx.Node) or not _is_layer(input_)) and reader is not None:
            problem = self.before_problem(bn, reader)
            return (reader, None) if problem is None else (None, f"before {reader.name}, but {problem}")
        if not isinstance(input_, fx.Node) or not _is_layer(input_):
            if isinstance(input_, fx.Node) and input_.target in (aten.addmm.default, aten.mm.default):
                return None, ("its input is a Linear decomposed into addmm/mm: fold before run_decompositions() "
                              "to fold it")
            return None, ("its input is not the output of a conv or linear node, and no such node alone "
                          "reads its output")
        if list(input_.users) != [bn] or any(a is input_ for a in bn.args[1:]):
            return None, f"the output of {input_.name} is also read elsewhere"
        # A BN normalises dim 1: the layer's channels only for a batched output
        # (rank 2 for a Linear, spatial dims + 2 for a conv), which the node's
        # recorded value shows.
        value = input_.meta.get("val", input_.meta.get("tensor_meta"))  # export's, or ShapeProp's
        weight = self.state.value(input_.args[1])
        batched = 2 if input_.target == aten.linear.default else (weight.dim() if weight is not None else -1)
        if value is None or len(value.shape) != batched:
            return None, (f"it normalises dim 1 of the output of {input_.name}, which is not a batched "
                          f"rank-{batched} tensor")
        problem = self.layer_problem(input_)
        if problem:
            return None, f"the layer before it, {input_.name}, cannot change: {problem}"
        return input_, None

    def _layer_reading(self, bn: fx.Node) -> fx.Node | None:
        """The conv or linear node that alone reads ``bn``'s output, as its input."""
        readers = _bn_output_users(bn)
        if readers is None or len(readers) != 1 or len(readers[0].users) != 1:
            return None
        (layer,) = readers[0].users
        if not _is_layer(layer) or layer.args[0] is not readers[0] or any(a is readers[0] for a in layer.args[1:]):
            return None
        return layer

    def before_problem(self, bn: fx.Node, layer: fx.Node) -> str | None:
        """Why ``bn`` does not fold exactly into ``layer``, which reads its output
        alone (docs/DESIGN.md section 2.4), or None."""
        if layer.target in _TRANSPOSED or (layer.target == aten.convolution.default and
                                           _argument(layer, 6, "transposed")):
            return "a batch norm before a transposed convolution does not fold exactly"
        if layer.target != aten.linear.default:
            padding = _argument(layer, 4, "padding", 0)
            if isinstance(padding, str) or any(p != 0 for p in ([padding] if isinstance(padding, int) else padding)):
                return "the conv pads its input with zeros, and zero-padding BN(x) is not BN of the padded x"
        value = bn.args[0].meta.get("val", bn.args[0].meta.get("tensor_meta"))
        weight = self.state.value(layer.args[1])
        batched = 2 if layer.target == aten.linear.default else (weight.dim() if weight is not None else -1)
        if value is None or len(value.shape) != batched:
            return f"its input is not a batched rank-{batched} tensor, so dim 1 may not be {layer.name}'s channels"
        nodes = list(self.graph.nodes)
        between = nodes[nodes.index(bn) + 1:nodes.index(layer)]
        if any(getattr(getattr(n.target, "_schema", None), "is_mutable", False) for n in between):
            return "an in-place op runs between the two (the folded graph passes the BN's input on as it is)"
        return self.layer_problem(layer)

    def plan(self) -> tuple[FusionPlan, list[tuple[fx.Node, fx.Node, bool]]]:
        """The plan, and (layer, bn, bn_is_before_layer) for each fold."""
        pairs, skipped, taken = [], [], set()
        for node in self.graph.nodes:
            if not _is_batch_norm(node):
                continue
            layer, why = self.explain_or_pair(node)
            before = layer is not None and node.args[0] is not layer
            if layer is not None and layer in taken:  # one fold per layer node
                layer, why = None, f"{layer.name} already takes another batch norm"
            if layer is None:
                skipped.append(Skip(node.name, why))
            else:
                taken.add(layer)
                pairs.append((layer, node, before))
        folds = [Fold(layer.name, before=(bn.name,)) if before else Fold(layer.name, after=(bn.name,))
                 for layer, bn, before in pairs]
        return FusionPlan(folds, skipped, "graph"), pairs


def has_aten_batch_norms(module: fx.GraphModule) -> bool:
    """Whether a GraphModule computes batch norms as aten nodes (as
    ``ExportedProgram.module()`` does), which :func:`fuse_graph_module` folds."""
    return any(node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
               and _is_batch_norm(node) for node in module.graph.nodes)


def plan_exported(model: ExportedProgram | fx.GraphModule) -> FusionPlan:
    """What :func:`fuse_exported` folds in ``model``, by node name."""
    return _Matcher(model).plan()[0]


def _layer_fold(state: _Program, layer: fx.Node, bn: fx.Node, affine) -> tuple[LayerFold, torch.Tensor]:
    weight = state.value(layer.args[1])
    bias_node = _argument(layer, 2, "bias")
    bias = state.value(bias_node) if bias_node is not None else None
    if layer.target == aten.convolution.default:  # (input, weight, bias, stride, padding, dilation, transposed, ..., groups)
        transposed, groups = bool(_argument(layer, 6, "transposed")), int(_argument(layer, 8, "groups", 1))
    else:  # conv_transposeNd(input, weight, bias, stride, padding, output_padding, groups, dilation)
        transposed, groups = layer.target in _TRANSPOSED, int(_argument(layer, 6, "groups", 1))
    scale, shift = affine.scale.to(weight.device), affine.shift.to(weight.device)
    old = torch.zeros_like(scale) if bias is None else bias.detach().double()
    new_bias = (old * scale + shift).to(weight.dtype if bias is None else bias.dtype)
    if transposed:
        return LayerFold(None, scale, groups, new_bias), weight
    return LayerFold(scale, None, 1, new_bias), weight


def _layer_fold_before(state: _Program, layer: fx.Node, affine) -> tuple[LayerFold, torch.Tensor]:
    """W'[o, c] = W[o, c] * s[c], b' = b + sum_{c,k} W[o, c, k] * t[c] (channels within the group)."""
    weight = state.value(layer.args[1])
    bias_node = _argument(layer, 2, "bias")
    bias = state.value(bias_node) if bias_node is not None else None
    groups = 1 if layer.target == aten.linear.default else int(
        _argument(layer, 8 if layer.target == aten.convolution.default else 6, "groups", 1))
    device = weight.device
    old = torch.zeros(weight.shape[0], dtype=torch.float64, device=device) if bias is None else bias.detach().double()
    new_bias = old + shift_sums(weight, affine.shift.to(device), groups)
    new_bias = new_bias.to(weight.dtype if bias is None else bias.dtype)
    return LayerFold(None, affine.scale.to(device), groups, new_bias), weight


def _folded_tensors(state, pairs, backend: str | None):
    """Each pair's LayerFold and new weight (float64, one rounding, range-checked)."""
    stats = []
    for layer, bn, _ in pairs:
        _, weight, bias, mean, var, eps, _ = _batch_norm_parts(bn)
        values = [state.value(t) if t is not None else None for t in (mean, var, weight, bias)]
        stats.append(BatchNormStats(values[0], values[1], values[2], values[3], float(eps), bn.name))
    affines = batchnorm_affines(stats)
    folds, weights = zip(*(_layer_fold_before(state, layer, affine) if before else _layer_fold(state, layer, bn, affine)
                           for (layer, bn, before), affine in zip(pairs, affines)))
    check_folded_range(weights, folds, [layer.name for layer, _, _ in pairs])
    new_weights = [torch.empty_like(w) for w in weights]
    kernels.rescale_(new_weights, [f.row_scale for f in folds], [f.col_scale for f in folds],
                     [f.groups for f in folds], sources=list(weights), backend=backend)
    return folds, new_weights


def _has_attribute(module: torch.nn.Module, path: str) -> bool:
    owner, _, name = path.rpartition(".")
    try:
        return hasattr(module.get_submodule(owner), name)
    except AttributeError:
        return False


def _remove_batch_norm(graph: fx.Graph, layer: fx.Node, bn: fx.Node, before: bool) -> list[fx.Node]:
    """Send the BN's readers to the layer (a BN after it) or to the BN's own input
    (a BN before it), and erase the BN; its parameter and statistics nodes come back."""
    replacement = bn.args[0] if before else layer
    for reader in _bn_output_users(bn):
        reader.replace_all_uses_with(replacement)
        if reader is not bn:
            graph.erase_node(reader)
    inputs = [a for a in bn.args[1:] if isinstance(a, fx.Node)]
    graph.erase_node(bn)
    return inputs


def _with_bias_argument(layer: fx.Node, bias: fx.Node) -> None:
    arguments = list(layer.args) + [None] * max(0, 3 - len(layer.args))
    arguments[2] = bias
    layer.args = tuple(arguments)


def fuse_graph_module(module: fx.GraphModule, *, backend: str | None = None) -> fx.GraphModule:
    """A copy of an aten-level GraphModule whose tensors are ``get_attr`` nodes
    (``ExportedProgram.module()``) with every foldable conv/linear -> batch norm
    pair folded; ``module`` is left as it was (the graph and its attributes are
    changed together, in the copy, so that nothing is ever half-written)."""
    matcher = _Matcher(module)
    _, pairs = matcher.plan()
    if not pairs:
        return module
    folds, new_weights = _folded_tensors(matcher.state, pairs, backend)
    target = copy.deepcopy(module)
    by_name = _copied_nodes(module.graph, target.graph)
    graph = target.graph

    def assign(path: str, tensor: torch.Tensor) -> None:
        owner, _, name = path.rpartition(".")
        setattr(target.get_submodule(owner), name, torch.nn.Parameter(tensor, requires_grad=False))

    for (old_layer, old_bn, before), fold, new_weight in zip(pairs, folds, new_weights):
        layer, bn = by_name[old_layer.name], by_name[old_bn.name]
        assign(layer.args[1].target, new_weight)
        bias = _argument(layer, 2, "bias")
        if bias is not None:
            assign(bias.target, fold.bias)
        else:
            owner = layer.args[1].target.rpartition(".")[0]
            name = "bias" if getattr(target.get_submodule(owner), "bias", None) is None else "folded_bias"
            path = f"{owner}.{name}" if owner else name
            while _has_attribute(target, path):  # a name nothing else uses
                path += "_"
            assign(path, fold.bias)
            with graph.inserting_after(layer.args[1]):
                _with_bias_argument(layer, graph.get_attr(path))
        for node in _remove_batch_norm(graph, layer, bn, before):
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
                owner, _, name = node.target.rpartition(".")
                if not any(n.op == "get_attr" and n.target == node.target for n in graph.nodes):
                    delattr(target.get_submodule(owner), name)
    graph.lint()
    target.recompile()
    return target


def _copied_nodes(original: fx.Graph, copied: fx.Graph) -> dict[str, fx.Node]:
    """Each node of ``original`` (by name) -> the node at its place in ``copied``,
    a deep copy of it. A copy names its nodes afresh, and a name that fx
    reserves is changed on the way (``input``, the argument of every
    ``nn.Sequential``, becomes ``input_1``, which may push another node's name
    along): nodes are matched by position, never by name."""
    return {old.name: new for old, new in zip(original.nodes, copied.nodes, strict=True)}


def _new_name(name: str, renames: tuple[dict[str, str], ...]) -> str:
    """``name`` through each of ``renames`` in turn."""
    for mapping in renames:
        name = mapping.get(name, name)
    return name


def _renamed_argument(argument, *renames: dict[str, str]):
    """``argument`` (a TensorArgument, SymIntArgument, ...) naming its node's new name."""
    name = getattr(argument, "name", None)
    if not isinstance(name, str) or _new_name(name, renames) == name:
        return argument
    return dataclasses.replace(argument, name=_new_name(name, renames))


def _with_new_names(spec, *renames: dict[str, str]):
    """A copy of an input or output spec whose argument names its node's new name,
    as does the target of an output that is a user input's mutation or gradient
    (an ExportedProgram whose signature names a node its graph lacks does not verify)."""
    spec = dataclasses.replace(spec, arg=_renamed_argument(spec.arg, *renames))
    if getattr(spec, "kind", None) in _OUTPUTS_NAMING_AN_INPUT:
        spec = dataclasses.replace(spec, target=_new_name(spec.target, renames))
    return spec


# Outputs whose target is the name of a user input's node.
_OUTPUTS_NAMING_AN_INPUT = (OutputKind.USER_INPUT_MUTATION, OutputKind.GRADIENT_TO_USER_INPUT)


def _call_entry_with_new_names(entry, *renames: dict[str, str]):
    """A copy of a module call graph entry whose signature names the nodes' new names."""
    entry = copy.deepcopy(entry)
    if entry.signature is not None:
        entry.signature.inputs = [_renamed_argument(argument, *renames) for argument in entry.signature.inputs]
        entry.signature.outputs = [_renamed_argument(argument, *renames) for argument in entry.signature.outputs]
    return entry


def fuse_exported(program: ExportedProgram, *, backend: str | None = None) -> ExportedProgram:
    """A new program with every foldable conv/linear -> batch norm pair folded
    (module docstring); ``program`` is left as it was."""
    matcher = _Matcher(program)
    _, pairs = matcher.plan()
    if not pairs:
        return program
    folds, new_weights = _folded_tensors(matcher.state, pairs, backend)

    # -- the new program: nothing of the caller's is modified ------------------
    graph_module = copy.deepcopy(program.graph_module)
    graph = graph_module.graph
    by_name = _copied_nodes(program.graph, graph)
    renames = {name: node.name for name, node in by_name.items() if node.name != name}
    state_dict = dict(program.state_dict)
    constants = dict(program.constants)
    specs = [_with_new_names(spec, renames) for spec in program.graph_signature.input_specs]
    spec_of = {spec.arg.name: spec for spec in specs if isinstance(spec.arg, TensorArgument)}

    def store(spec: InputSpec, tensor: torch.Tensor) -> None:
        (constants if spec.kind == InputKind.CONSTANT_TENSOR or spec.target not in state_dict else state_dict)[
            spec.target] = torch.nn.Parameter(tensor, requires_grad=False) \
            if spec.kind == InputKind.PARAMETER else tensor

    renamed: dict[str, str] = {}  # a BN output a signature named -> the layer now in its place
    for (old_layer, old_bn, before), fold, new_weight in zip(pairs, folds, new_weights):
        layer, bn = by_name[old_layer.name], by_name[old_bn.name]
        renamed.update({reader.name: layer.name for reader in _bn_output_users(bn)})
        weight_node = layer.args[1]
        store(spec_of[weight_node.name], new_weight)
        bias_node = _argument(layer, 2, "bias")
        if bias_node is not None:
            store(spec_of[bias_node.name], fold.bias)
        else:  # a new parameter placeholder, right after the weight's
            target = spec_of[weight_node.name].target.rpartition(".")[0] + ".bias" \
                if spec_of[weight_node.name].target.endswith(".weight") else spec_of[weight_node.name].target + "_bias"
            with graph.inserting_after(weight_node):
                bias_node = graph.placeholder(f"{weight_node.name}_folded_bias")
            if "val" in weight_node.meta:
                bias_node.meta["val"] = weight_node.meta["val"].fake_mode.from_tensor(fold.bias)
            spec = InputSpec(InputKind.PARAMETER, TensorArgument(bias_node.name), target)
            specs.insert(specs.index(spec_of[weight_node.name]) + 1, spec)
            spec_of[bias_node.name] = spec
            state_dict[target] = torch.nn.Parameter(fold.bias, requires_grad=False)
            _with_bias_argument(layer, bias_node)
        bn_inputs = _remove_batch_norm(graph, layer, bn, before)
        prefix = spec_of[bn_inputs[-1].name].target.rpartition(".")[0]  # the BN module's path
        for node in list(graph.nodes):  # its placeholders (num_batches_tracked included), now unread
            spec = spec_of.get(node.name)
            if node.op == "placeholder" and not node.users and spec is not None and \
                    spec.target is not None and spec.target.rpartition(".")[0] == prefix:
                graph.erase_node(node)
                specs.remove(spec)
                state_dict.pop(spec.target, None)
                constants.pop(spec.target, None)
    graph.lint()
    graph_module.recompile()
    # The program's outputs, and those of the submodules whose call signature
    # export preserved, name the layer where they named the BN it absorbed.
    outputs = [_with_new_names(spec, renames, renamed) for spec in program.graph_signature.output_specs]
    signature = ExportGraphSignature(input_specs=specs, output_specs=outputs)
    return ExportedProgram(
        root=graph_module, graph=graph, graph_signature=signature, state_dict=state_dict,
        range_constraints=program.range_constraints,
        module_call_graph=[_call_entry_with_new_names(entry, renames, renamed) for entry in program.module_call_graph],
        example_inputs=program.example_inputs, constants=constants, verifiers=[program.verifier])
