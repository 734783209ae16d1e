"""Folded models export to ONNX with the dynamo exporter and run in onnxruntime.

For torchvision resnet18 and mobilenet_v3_small and timm efficientnet_b0
(random weights, ``pretrained=False``/``weights=None``, nothing downloaded; BN
statistics drawn at random, never zeros or ones), on a 1x3x64x64 input:

* ``torch.onnx.export(folded, (x,), dynamo=True, optimize=False)``: the ONNX
  graph has no BatchNormalization node, while the unfolded model's export (same
  options) has one per BatchNorm-like module. ``optimize=False`` matters: the
  exporter's default onnxscript optimizer (``optimize=True``) fuses
  BatchNormalization into Conv by itself, so with it the unfolded graph has no
  BN node either and the check would prove nothing.
* that graph, and the default export (``optimize=True``, what a user gets), run
  in onnxruntime (CPU) give the folded PyTorch model's float32 output within
  ``ORT_RTOL`` relative error (``||ort - torch|| / ||torch||``, see below).

Needs the optional ``onnx`` extra (``pip install -e ".[onnx]"``: onnx,
onnxscript, onnxruntime); skipped cleanly without it.
"""

from __future__ import annotations

import collections

import pytest
import torch

import fusedconv
from utils import float64_reference, randomize_batchnorm_stats, relative_error

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # the dynamo exporter's ONNX builder
ort = pytest.importorskip("onnxruntime")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.slow

# Both sides run the same float32 graph with the same folded weights; only the
# kernels differ (oneDNN/ATen in torch, MLAS in onnxruntime), so the outputs
# differ by float32 rounding in another summation order: measured 6e-7 to 8e-7
# relative on these models, a few float32 ulps (eps = 1.2e-7). 1e-5 leaves a
# 12x margin and still catches small faults: adding 0.05 to one bias element of
# one folded conv moves the output by 3e-4; a wrong fold (wrong axis, a missing
# shift, stale weights exported) is off by far more.
ORT_RTOL = 1e-5
# The whole chain (fold, export, onnxruntime) against a float64 run of the
# *unfolded* model: measured 4e-7 to 5e-7 (the unfolded float32 model itself is
# 4e-7 to 9e-7 off float64 here), so the same 1e-5 bound.
FLOAT64_RTOL = 1e-5

MODELS = {
    "torchvision.resnet18": lambda: torchvision.models.resnet18(weights=None),
    "torchvision.mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None),
    "timm.efficientnet_b0": lambda: timm.create_model("efficientnet_b0", pretrained=False),
}


def _export(model, x, *, optimize):
    program = torch.onnx.export(model, (x,), dynamo=True, optimize=optimize, verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto)
    return proto


def _op_counts(proto) -> collections.Counter:
    """op_type counts over the main graph, its subgraphs and local functions."""
    counts: collections.Counter = collections.Counter()

    def visit(graph):
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(proto.graph)
    for function in proto.functions:
        for node in function.node:
            counts[node.op_type] += 1
    return counts


def _run_ort(proto, x: torch.Tensor) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    (output,) = session.run(None, {feed.name: x.numpy()})
    return torch.from_numpy(output)


@pytest.mark.parametrize("name", list(MODELS))
def test_folded_model_exports_with_dynamo_and_matches_in_onnxruntime(name):
    generator = torch.Generator().manual_seed(13)
    model = randomize_batchnorm_stats(MODELS[name](), generator).eval()
    x = torch.randn(1, 3, 64, 64, generator=generator)
    n_bn = fusedconv.count_batchnorms(model)
    assert n_bn > 0

    folded = fusedconv.fuse(model, example_inputs=(x,))
    assert fusedconv.count_batchnorms(folded) == 0, "every BN of these models is foldable"
    with torch.no_grad():
        expected = folded(x)

    unfolded_ops = _op_counts(_export(model, x, optimize=False))
    assert unfolded_ops["BatchNormalization"] == n_bn, unfolded_ops

    plain = _export(folded, x, optimize=False)
    plain_ops = _op_counts(plain)
    assert plain_ops["BatchNormalization"] == 0, plain_ops
    assert plain_ops["Conv"] == unfolded_ops["Conv"], (plain_ops, unfolded_ops)

    optimized = _export(folded, x, optimize=True)
    assert _op_counts(optimized)["BatchNormalization"] == 0

    for label, proto in (("optimize=False", plain), ("optimize=True", optimized)):
        got = _run_ort(proto, x)
        assert got.shape == expected.shape and got.dtype == torch.float32
        error = relative_error(got, expected)
        assert error <= ORT_RTOL, f"{name} ({label}): onnxruntime vs folded torch: {error:.3g}"

    reference = float64_reference(model, (x,))
    error = relative_error(got, reference)
    assert error <= FLOAT64_RTOL, f"{name}: onnxruntime vs float64 unfolded model: {error:.3g}"
