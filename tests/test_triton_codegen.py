"""The Triton kernels' generated code and index arithmetic.

* Both kernels are compiled offline for sm_90 (no GPU needed) and their PTX is
  checked for what the results and the speed depend on: no fused multiply-add
  (the reference rounds the product), and no per-element 64-bit integer
  division (NVIDIA GPUs have none: each is a software routine of dozens of
  instructions, enough to make these memory-bound kernels compute-bound).
* The chunk-relative int32 index math is checked bit for bit against the
  torch backend across many chunk and block seams (with a small chunk), and
  tensors too large for it must go through the reference.
"""

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

from fusedconv import kernels
from fusedconv.kernels.backends import available_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = available_backends(DEVICE)["triton"] is None
REPO = Path(__file__).resolve().parents[1]

# Run in a fresh process: under TRITON_INTERPRET=1 (which conftest sets on
# machines without a GPU) @triton.jit makes interpreted functions, which
# cannot be compiled.
_COMPILE = textwrap.dedent(
    """
    import json, re, sys

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    TARGET = GPUTarget("cuda", 90, 32)


    @triton.jit
    def _probe(x):
        tl.store(x, tl.load(x) + 1)


    try:  # can this machine compile for sm_90 at all (the bundled ptxas, the nvidia backend)?
        compile(ASTSource(_probe, {"x": "*fp32"}), target=TARGET)
    except Exception as exc:
        print(json.dumps({"skip": f"offline compilation for sm_90 fails here: {type(exc).__name__}: {exc}"}))
        sys.exit(0)

    from fusedconv.kernels import triton_ops as ops

    counts = {}
    for kernel, block in ((ops._rescale_kernel, ops._RESCALE_BLOCK), (ops._pad_add_kernel, ops._PAD_ADD_BLOCK)):
        for dtype in ("float16", "bfloat16", "float32", "float64"):
            signature = {"targets": "*i64", "items": "*i64", "chunks": "*i64",
                         "ELEMENT": "constexpr", "CHUNK": "constexpr", "BLOCK": "constexpr"}
            constexprs = {"ELEMENT": getattr(tl, dtype), "CHUNK": ops._CHUNK, "BLOCK": block}
            # The options the launches use (_launch)
            compiled = compile(ASTSource(kernel, signature, constexprs), target=TARGET,
                               options={"enable_fp_fusion": False})
            ptx = compiled.asm["ptx"]
            counts[f"{kernel.__name__}[{dtype}]"] = {
                "div64": len(re.findall(r"\\b(?:div|rem)\\.[su]64\\b", ptx)),
                "fma": len(re.findall(r"\\bfma\\.rn[.a-z]*\\.f(?:32|64)\\b", ptx)),
                "div32": len(re.findall(r"\\b(?:div|rem)\\.[su]32\\b", ptx)),
            }
    print(json.dumps({"counts": counts}))
    """
)

# 64-bit div/rem instructions allowed per kernel: only per-program setup (the
# chunk's first row), none per element. They are 1 today.
MAX_DIV64 = 4


def test_kernels_compile_for_sm90_without_fma_or_64_bit_division(tmp_path):
    pytest.importorskip("triton")
    script = tmp_path / "compile_kernels.py"  # a file: @triton.jit reads its functions' source
    script.write_text(_COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    counts = result["counts"]
    assert len(counts) == 8
    for name, found in counts.items():
        assert found["fma"] == 0, (name, found)
        assert found["div64"] <= MAX_DIV64, (name, found)


def _random_scale(n: int, gen: torch.Generator) -> torch.Tensor:
    sign = torch.where(torch.rand(n, generator=gen) < 0.2, -1.0, 1.0).double()
    return ((torch.rand(n, generator=gen, dtype=torch.float64) * 1.5 + 0.25) * sign).to(DEVICE)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 96 elements walked in blocks of 32: rows and groups that
    start, end and span chunks and blocks in every way, at test sizes."""
    from fusedconv.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "_CHUNK", 96)
    monkeypatch.setattr(triton_ops, "_RESCALE_BLOCK", 32)
    monkeypatch.setattr(triton_ops, "_PAD_ADD_BLOCK", 32)
    return triton_ops


def _rescale_case(gen):
    """(weight, row scale, column scale, groups): rows shorter and longer than a
    chunk or a block, groups, channels_last, both scales, a weight listed twice
    (row lengths 65, 18, 9, 48, 41, 200, 75)."""
    shapes = [((7, 13, 5), 1), ((12, 2, 3, 3), 3), ((8, 1, 3, 3), 8), ((6, 4, 2, 3, 2), 2), ((5, 41), 1),
              ((3, 200), 1), ((16, 3, 5, 5), 2)]
    entries = []
    for i, (shape, g) in enumerate(shapes):
        w = torch.randn(shape, generator=gen).to(DEVICE)
        if i % 2 and w.dim() in (4, 5):
            w = w.to(memory_format=torch.channels_last if w.dim() == 4 else torch.channels_last_3d)
        row = _random_scale(shape[0], gen) if i % 3 != 1 else None
        col = _random_scale(g * shape[1], gen) if i % 3 != 0 else None
        entries.append((w, row, col, g))
    w, _, _, g = entries[1]
    entries.append((w, _random_scale(w.shape[0], gen), _random_scale(g * w.shape[1], gen), g))
    return entries


def _check_rescale(entries):
    weights = list(dict.fromkeys(w for w, *_ in entries))  # distinct, in order
    expected = {id(w): w.clone() for w in weights}
    rows, cols, groups = ([e[i] for e in entries] for i in (1, 2, 3))
    kernels.rescale_([expected[id(w)] for w, *_ in entries], rows, cols, groups, backend="torch")
    kernels.rescale_([w for w, *_ in entries], rows, cols, groups, backend="triton")
    for w in weights:
        assert torch.equal(w, expected[id(w)]), tuple(w.shape)


def _pad_add_case(gen):
    """RepVGG, ACNet, dilated, 1d and 3d pairs, channels_last, two big kernels with two windows
    (big rows of 36, 36, 147, 27, 90 and 845 elements; small kernels of 24, 72, 108, 45, 18,
    500, then 24 and 105)."""
    pairs = [((6, 4, 3, 3), (6, 4, 1, 1), (1, 1), (1, 1)), ((6, 4, 3, 3), (6, 4, 1, 3), (1, 0), (1, 1)),
             ((4, 3, 7, 7), (4, 3, 3, 3), (1, 1), (2, 2)), ((5, 3, 9), (5, 3, 3), (1,), (3,)),
             ((3, 2, 3, 5, 3), (3, 2, 1, 3, 1), (1, 0, 1), (1, 2, 1)), ((4, 5, 13, 13), (4, 5, 5, 5), (4, 4), (1, 1))]
    bigs, smalls, scales, offsets, dilations = [], [], [], [], []
    for i, (big_shape, small_shape, off, dil) in enumerate(pairs):
        big = torch.randn(big_shape, generator=gen).to(DEVICE)
        small = torch.randn(small_shape, generator=gen).to(DEVICE)
        if i % 2 and big.dim() == 4:
            big, small = (t.to(memory_format=torch.channels_last) for t in (big, small))
        bigs.append(big)
        smalls.append(small)
        scales.append(_random_scale(big_shape[0], gen) if i % 3 else None)
        offsets += off
        dilations += dil
    # Second windows into two big kernels: applied after the first, rounded after each.
    for at, small_shape, off, dil in ((0, (6, 4, 1, 1), [0, 2], [1, 1]), (3, (5, 3, 7), [1], [1])):
        bigs.append(bigs[at])
        smalls.append(torch.randn(small_shape, generator=gen).to(DEVICE))
        scales.append(_random_scale(small_shape[0], gen))
        offsets += off
        dilations += dil
    return bigs, smalls, scales, offsets, dilations


def _check_pad_add(bigs, smalls, scales, offsets, dilations):
    distinct = list(dict.fromkeys(bigs))
    expected = {id(b): b.clone() for b in distinct}
    kernels.pad_add_([expected[id(b)] for b in bigs], smalls, scales, offsets, dilations, backend="torch")
    kernels.pad_add_(bigs, smalls, scales, offsets, dilations, backend="triton")
    for b in distinct:
        assert torch.equal(b, expected[id(b)]), tuple(b.shape)


needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="the triton backend does not run here")


@needs_triton
def test_rescale_is_exact_across_chunk_and_block_seams(small_chunks):
    _check_rescale(_rescale_case(torch.Generator().manual_seed(21)))


@needs_triton
def test_pad_add_is_exact_across_chunk_and_block_seams(small_chunks):
    _check_pad_add(*_pad_add_case(torch.Generator().manual_seed(22)))


@needs_triton
def test_tensors_too_large_for_int32_offsets_go_through_the_reference(small_chunks, monkeypatch):
    """With the limit lowered, the tensors whose rows (or small kernels) reach it
    take the reference, all entries of a big kernel together; the rest of the
    call still runs in the kernel, and every tensor gets the torch bits."""
    sent = []

    def recorded(name):
        original = getattr(reference, name)

        def call(*args):
            sent.append((name, sorted(tuple(t.shape) for t in args[0])))
            return original(*args)
        return call

    from fusedconv.kernels import reference

    monkeypatch.setattr(small_chunks, "reference", SimpleNamespace(rescale_=recorded("rescale_"),
                                                                   pad_add_=recorded("pad_add_")))
    monkeypatch.setattr(small_chunks, "_INT32_LIMIT", 50)
    _check_rescale(_rescale_case(torch.Generator().manual_seed(23)))
    monkeypatch.setattr(small_chunks, "_INT32_LIMIT", 100)
    _check_pad_add(*_pad_add_case(torch.Generator().manual_seed(24)))
    assert sent == [
        ("rescale_", [(3, 200), (7, 13, 5), (16, 3, 5, 5)]),  # rows of 200, 65 and 75 elements
        # rows of 147 and 845; a small kernel of 105 takes its big kernel's other window along
        ("pad_add_", [(4, 3, 7, 7), (4, 5, 13, 13), (5, 3, 9), (5, 3, 9)]),
    ], sent
