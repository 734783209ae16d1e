"""Seeded generator of random BatchNorm models, written out as real Python source.

Every model is a *class* in a file of its own, imported with importlib under a
unique module name, so that ``inspect.getsource`` works and fusedconv's
source reading (``fusedconv/dataflow/source.py``) sees real code, exactly as it
would for a user's model.

The grammar is typed: the generator tracks the shape of the running tensor
``x`` (a :class:`Shape`: ``(N, C, *spatial)``, ``(N, F)`` or ``(N, L, C)``) and
only emits layers, reshapes and joins that are legal for it, so every model
runs. Beside the plain Conv/ConvTranspose/Linear + BatchNorm patterns it emits
the traps that a BatchNorm folder must recognise (shared children, indirect
references, in-place ops, hooks, tied weights, corrupted statistics, ...); each
trap adds a tag to ``TAGS`` (``"trap:..."``) so that failures can be grouped by
the feature that causes them.

A generated file defines ``SEED``, ``DTYPE``, ``TAGS``, ``class Net`` and
``make() -> (model, example_inputs, test_inputs)``, which builds the model
deterministically (inside ``torch.random.fork_rng``, so the caller's RNG is
untouched), draws random BatchNorm statistics, applies the corruptions and puts
the model in eval mode. BNs that must never be folded carry an attribute
``_fuzz_corrupt`` naming the corruption.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BATCH = 2
MAX_SIZE = {1: 20, 2: 10, 3: 6}  # largest spatial size per dim, keeps every model tiny
START_SIZE = {1: (6, 16), 2: (4, 9), 3: (3, 5)}


@dataclass(frozen=True)
class Shape:
    """Shape of the running tensor, without the batch dim.

    kind "sp": (N, c, *s), a conv feature map of ``len(s)`` spatial dims;
    kind "flat": (N, c); kind "seq": (N, s[0], c), tokens with c features.
    """

    kind: str
    c: int
    s: tuple[int, ...] = ()

    @property
    def d(self) -> int:
        return len(self.s)

    def full(self) -> tuple[int, ...]:
        if self.kind == "sp":
            return (BATCH, self.c, *self.s)
        if self.kind == "flat":
            return (BATCH, self.c)
        return (BATCH, self.s[0], self.c)


# --------------------------------------------------------------------------- helper code
# Module-level code that generated models may need; emitted once per file, on demand.

HELPERS = {
    "FuzzSeq": '''
class FuzzSeq(nn.Sequential):
    """A Sequential subclass that changes nothing: must fold like nn.Sequential."""
''',
    "FuzzSeqIter": '''
class FuzzSeqIter(nn.Sequential):
    """Overrides __iter__ (which nn.Sequential.forward uses): the last module never runs."""

    def __iter__(self):
        return iter(list(self._modules.values())[:-1])
''',
    "FuzzSeqRev": '''
class FuzzSeqRev(nn.Sequential):
    """Overrides __getitem__: index i is the i-th module from the END of the registration order."""

    def __getitem__(self, idx):
        return list(self._modules.values())[::-1][idx]
''',
    "FuzzHolder": '''
class FuzzHolder(nn.Module):
    """Keeps its module in a plain list: not registered here, but it runs here."""

    def __init__(self, mod):
        super().__init__()
        self.items = [mod]

    def forward(self, x):
        return self.items[0](x)
''',
    "FuzzBox": '''
@dataclasses.dataclass
class FuzzBox:
    mod: object
''',
    "hooks": '''
def _fuzz_hook(module, args, output):
    return output * 1.25 + 0.1


def _fuzz_pre_hook(module, args):
    return (args[0] * 0.75,)
''',
    "FuzzObserver": '''
class FuzzObserver(nn.Module):
    """A quantization-style observer: every forward updates its buffers (output unchanged)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("max_abs", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        self.max_abs.copy_(torch.maximum(self.max_abs, x.detach().abs().max().to(self.max_abs.dtype)))
        return x
''',
    "FuzzScaleParam": '''
class FuzzScaleParam(nn.Module):
    """A parametrization: the layer's weight is computed from the stored one."""

    def forward(self, w):
        return w * 1.5
''',
}
for _d in (1, 2, 3):
    HELPERS[f"WSConv{_d}d"] = f'''
class WSConv{_d}d(nn.Conv{_d}d):
    """Weight standardization in _conv_forward: scaling the weight changes nothing."""

    def _conv_forward(self, input, weight, bias):
        dims = tuple(range(1, weight.dim()))
        w = (weight - weight.mean(dims, keepdim=True)) / (weight.std(dims, keepdim=True, correction=0) + 1e-5)
        return super()._conv_forward(input, w, bias)
'''
    HELPERS[f"OwnConv{_d}d"] = f'''
class OwnConv{_d}d(nn.Conv{_d}d):
    """Overrides forward."""

    def forward(self, x):
        return super().forward(x * 0.5) + 1.0
'''
    HELPERS[f"PlainConv{_d}d"] = f'''
class PlainConv{_d}d(nn.Conv{_d}d):
    """A conv subclass that overrides nothing: must fold like nn.Conv{_d}d."""
'''
    HELPERS[f"ScaledBN{_d}d"] = f'''
class ScaledBN{_d}d(nn.BatchNorm{_d}d):
    """A BatchNorm subclass with its own forward: not a plain BatchNorm."""

    def forward(self, x):
        return super().forward(x) * 1.5
'''

HEADER = '''"""Generated by tests/fuzz/generator.py (seed {seed}); replay: python -m tests.fuzz --replay THIS_FILE"""
import collections
import dataclasses
import functools
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

SEED = {seed}
DTYPE = torch.{dtype}
TAGS = {tags!r}
INPUT_SCALE = {input_scale!r}
INPUT_SHAPE = {input_shape!r}
'''

MAKE = '''

def _randomize(model, g):
    """Random BatchNorm statistics (never 0/1, which hide a wrong axis or a lost term)."""
    for m in model.modules():
        mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
            continue
        n = mean.numel()
        draw = lambda lo, hi: torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo
        values = {{"running_mean": torch.randn(n, generator=g, dtype=torch.float64) * 0.5,
                  "running_var": draw(0.3, 2.0)}}
        if isinstance(getattr(m, "weight", None), torch.Tensor):
            sign = torch.where(torch.rand(n, generator=g) < 0.15, -1.0, 1.0).double()
            values["weight"] = draw(0.5, 1.5) * sign
        if isinstance(getattr(m, "bias", None), torch.Tensor):
            values["bias"] = torch.randn(n, generator=g, dtype=torch.float64) * 0.3
        for name, value in values.items():
            t = getattr(m, name)
            # BNs built under torch.inference_mode hold inference tensors, which
            # may only be written inside inference mode.
            with torch.inference_mode(t.is_inference()), torch.no_grad():
                t.copy_(value)


def make():
    """(model, example_inputs, test_inputs), the same for every call."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Net()
    if DTYPE != torch.float32:
        model.to(DTYPE)
    g = torch.Generator().manual_seed(SEED)
    _randomize(model, g)
    model.eval()
    with torch.no_grad():
{post}
    example = (torch.randn(INPUT_SHAPE, generator=g, dtype=torch.float64) * INPUT_SCALE).to(DTYPE)
    test = (torch.randn(INPUT_SHAPE, generator=g, dtype=torch.float64) * INPUT_SCALE).to(DTYPE)
    return model, (example,), (test,)
'''


class Ctx:
    """Everything one model's source is being built from."""

    def __init__(self, rng: random.Random, dtype: str):
        self.rng = rng
        self.dtype = dtype
        self.init: list[str] = []  # __init__ body, at 8 spaces
        self.fwd: list[str] = []  # forward body, indentation included
        self.level = 2
        self.helpers: dict[str, str] = {}
        self.class_attrs: list[str] = []
        self.globals: list[str] = []
        self.post: list[str] = []  # make() lines after eval(), at 8 spaces, operate on `model`
        self.tags: set[str] = set()
        self.n = 0
        # True when `x` is a tensor the forward made itself (not the caller's
        # input, nor a view of it): only then may an in-place op touch it.
        self.owned = False
        self.input_scale = 1.0
        self.no_inference_mode = dtype != "float32"

    # small utilities
    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def emit(self, line: str) -> None:
        self.fwd.append("    " * self.level + line)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def helper(self, key: str) -> str:
        self.helpers[key] = HELPERS[key]
        return key

    def trap(self, tag: str) -> None:
        self.tags.add("trap:" + tag)


# --------------------------------------------------------------------------- layers


def _conv_out(size, k, stride, pad, dil, transposed, out_pad=0):
    if transposed:
        return (size - 1) * stride - 2 * pad + dil * (k - 1) + out_pad + 1
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def conv_ctor(ctx: Ctx, shape: Shape, *, preserve=False, out_c=None, transposed=None):
    """A random Conv/ConvTranspose for ``shape``: (class name, kwargs source, output shape).

    ``preserve`` keeps the spatial size (stride 1, symmetric padding)."""
    rng, d, cin = ctx.rng, shape.d, shape.c
    for _ in range(40):
        tr = ctx.chance(0.25) if transposed is None else transposed
        # channels and groups (depthwise included)
        oc = out_c
        groups = 1
        if oc is None and ctx.chance(0.15):
            groups, oc = cin, cin * rng.choice([1, 2])
        elif oc is None:
            oc = rng.randint(1, 8)
        if groups == 1 and ctx.chance(0.3):
            cands = [g for g in range(2, cin + 1) if cin % g == 0 and oc % g == 0]
            if cands:
                groups = rng.choice(cands)
        dil = 2 if ctx.chance(0.2) else 1
        if preserve:
            k = rng.choice([1, 3, 3])
            stride = 1
        else:
            k = rng.choice([1, 2, 3, 3])
            too_big = any(s > MAX_SIZE[d] for s in shape.s)
            stride = 2 if too_big or ctx.chance(0.25) else 1
        kernel = k
        if d >= 2 and not preserve and ctx.chance(0.15):
            kernel = tuple(rng.choice([1, 2, 3]) for _ in range(d))
        ks = kernel if isinstance(kernel, tuple) else (kernel,) * d
        kw = {}
        mode = "zeros"
        out_pad = 0
        if tr:
            if preserve:
                if any((dil * (kk - 1)) % 2 for kk in ks):
                    continue
                pads = [dil * (kk - 1) // 2 for kk in ks]
            else:
                pads = [rng.randint(0, dil * (kk - 1)) for kk in ks]
                if stride > 1 or dil > 1:
                    out_pad = rng.randint(0, max(stride, dil) - 1)
            pad = pads[0] if len(set(pads)) == 1 else tuple(pads)
            outs = [_conv_out(s, kk, stride, p, dil, True, out_pad) for s, kk, p in zip(shape.s, ks, pads)]
            if out_pad:
                kw["output_padding"] = out_pad
        else:
            choice = rng.random()
            if preserve:
                if any((dil * (kk - 1)) % 2 for kk in ks):
                    continue
                pads = [dil * (kk - 1) // 2 for kk in ks]
                pad = "same" if choice < 0.4 else (pads[0] if len(set(pads)) == 1 else tuple(pads))
            elif stride == 1 and choice < 0.2:
                pad = "same"
                pads = [dil * (kk - 1) // 2 + 1 for kk in ks]  # worst side, for the reflect check
            elif choice < 0.3:
                pad, pads = "valid", [0] * d
            else:
                pads = [rng.randint(0, max(1, dil * (kk - 1) // 2 + (kk > 1))) for kk in ks]
                pad = pads[0] if len(set(pads)) == 1 else tuple(pads)
            if pad == "same":
                outs = list(shape.s)
            else:
                outs = [_conv_out(s, kk, stride, p, dil, False) for s, kk, p in zip(shape.s, ks, pads)]
            if any(p > 0 for p in pads) and ctx.chance(0.4):
                mode = rng.choice(["reflect", "replicate", "circular"])
                if any(p >= s for p, s in zip(pads, shape.s)):
                    mode = "zeros"
        if min(outs) < 1 or max(outs) > int(MAX_SIZE[d] * 1.5):
            continue
        if preserve and list(outs) != list(shape.s):
            continue
        cls = f"ConvTranspose{d}d" if tr else f"Conv{d}d"
        kw.update(stride=stride, padding=pad, dilation=dil, groups=groups, bias=ctx.chance(0.6))
        if mode != "zeros":
            kw["padding_mode"] = mode
        ctx.tags.add(cls)
        return cls, f"{cin}, {oc}, {kernel!r}, " + ", ".join(f"{a}={b!r}" for a, b in kw.items()), \
            Shape("sp", oc, tuple(outs))
    # fallback: a 1x1 conv always fits
    oc = out_c or cin
    return f"Conv{d}d", f"{cin}, {oc}, 1, bias=True", Shape("sp", oc, shape.s)


def bn_ctor(ctx: Ctx, d: int, channels: int, *, plain=False) -> str:
    """Source of a random BatchNorm{d}d over ``channels`` (affine and running stats on/off)."""
    kw = []
    if ctx.chance(0.2):
        kw.append(f"eps={ctx.rng.choice([1e-3, 0.1, 1e-5])!r}")
    if ctx.chance(0.15):
        kw.append("affine=False")
        ctx.tags.add("bn_affine_false")
    if not plain and ctx.chance(0.03):
        kw.append("track_running_stats=False")
        ctx.trap("bn_no_running_stats")
    cls = f"nn.BatchNorm{d}d"
    if not plain and ctx.chance(0.02):
        cls = ctx.helper(f"ScaledBN{d}d")
        ctx.trap("bn_own_forward")
    return f"{cls}({', '.join([str(channels)] + kw)})"


@dataclass
class Mod:
    """One module of a unit: its local name in __init__, constructor, and role."""

    local: str
    ctor: str
    role: str  # "pre", "layer" or "post"
    dead: bool = False  # registered but never run (its channels may be wrong)
    inference: bool = False  # built under torch.inference_mode()
    ctor_after: str | None = None  # a line run on the local after construction (hook, parametrize)


def _build_locals(ctx: Ctx, mods: list[Mod]) -> None:
    """Construct each module into a local of __init__ (so containers can take them)."""
    for m in mods:
        if m.inference:
            ctx.init.append("with torch.inference_mode():")
            ctx.init.append(f"    {m.local} = {m.ctor}")
        else:
            ctx.init.append(f"{m.local} = {m.ctor}")


def _layer_modifier(ctx: Ctx, layer: Mod, d: int | None, transposed: bool) -> None:
    """Rarely, make the layer something that must not be folded into (or must fold as usual)."""
    r = ctx.rng.random()
    if r < 0.015 and d and not transposed:
        layer.ctor = layer.ctor.replace(f"nn.Conv{d}d(", ctx.helper(f"WSConv{d}d") + "(")
        ctx.trap("conv_weight_standardization")
    elif r < 0.025 and d and not transposed:
        layer.ctor = layer.ctor.replace(f"nn.Conv{d}d(", ctx.helper(f"OwnConv{d}d") + "(")
        ctx.trap("conv_own_forward")
    elif r < 0.035 and d and not transposed:
        layer.ctor = layer.ctor.replace(f"nn.Conv{d}d(", ctx.helper(f"PlainConv{d}d") + "(")
        ctx.tags.add("conv_plain_subclass")
    elif r < 0.05:
        ctx.helper("hooks")
        hook = ctx.rng.choice(["register_forward_hook(_fuzz_hook)", "register_forward_pre_hook(_fuzz_pre_hook)"])
        layer.ctor_after = f"{layer.local}.{hook}"
        ctx.trap("layer_hook")
    elif r < 0.06:
        ctx.helper("FuzzScaleParam")
        layer.ctor_after = f'parametrize.register_parametrization({layer.local}, "weight", FuzzScaleParam())'
        ctx.trap("parametrize")
    elif r < 0.075 and not ctx.no_inference_mode:
        layer.inference = True
        ctx.trap("inference_mode_layer")


def make_unit_mods(ctx: Ctx, shape: Shape, *, preserve=False, out_c=None, allow_pre=True,
                   min_post=0) -> tuple[list[Mod], Shape]:
    """Pre-BNs, a layer and post-BNs for ``shape`` (sp or flat)."""
    mods: list[Mod] = []
    d = shape.d if shape.kind == "sp" else 1
    if allow_pre and ctx.chance(0.3):
        for _ in range(ctx.rng.choice([1, 1, 2])):
            mods.append(Mod(ctx.name("bn"), bn_ctor(ctx, d, shape.c), "pre"))
        ctx.tags.add("pre_bn")
    transposed = False
    if shape.kind == "sp":
        cls, args, out = conv_ctor(ctx, shape, preserve=preserve, out_c=out_c)
        transposed = cls.startswith("ConvT")
        layer = Mod(ctx.name("conv"), f"nn.{cls}({args})", "layer")
        conv_d = shape.d
    else:
        oc = out_c or ctx.rng.randint(1, 12)
        layer = Mod(ctx.name("lin"), f"nn.Linear({shape.c}, {oc}, bias={ctx.chance(0.7)})", "layer")
        out = Shape("flat", oc)
        ctx.tags.add("Linear")
        conv_d = None
    layer.ctor_after = None
    _layer_modifier(ctx, layer, conv_d, transposed)
    mods.append(layer)
    n_post = ctx.rng.choice([0, 1, 1, 1, 2, 3]) if ctx.chance(0.85) else 0
    for _ in range(max(n_post, min_post)):
        mods.append(Mod(ctx.name("bn"), bn_ctor(ctx, d, out.c), "post"))
        if not ctx.no_inference_mode and ctx.chance(0.01):
            mods[-1].inference = True  # its statistics are inference tensors
            ctx.trap("inference_mode_bn")
    if sum(m.role == "post" for m in mods) > 1 or sum(m.role == "pre" for m in mods) > 1:
        ctx.tags.add("bn_chain")
    for m in mods:
        if m.role != "layer" and ctx.chance(0.02):
            ctx.helper("hooks")
            m.ctor_after = f"{m.local}.register_forward_hook(_fuzz_hook)"
            ctx.trap("bn_hook")
        elif m.role != "layer":
            m.ctor_after = None
    return mods, out


# --------------------------------------------------------------------------- emitting a unit

STYLES = {
    "inline": 10, "stmts": 8, "sequential": 6, "seq_odict": 2, "seq_sub": 2, "modulelist": 3,
    "moduledict": 2, "moduledict_loop": 1, "getattr": 1, "meta_between": 2, "checkpoint_seq": 1,
    "checkpoint_layer": 1, "checkpoint_sequential": 1,
    # traps
    "indirect": 3, "seq_sub_iter": 1, "seq_sub_getitem": 1, "class_shadow": 1,
}

INDIRECT = ["_modules", "partial", "bound_forward", "namespace", "dataclass", "nested_list", "lambda", "holder"]


def _indirect_call(ctx: Ctx, m: Mod, kind: str):
    """Set up an indirect way to reach ``self.<m.local>`` and return its call builder."""
    attr = ctx.name("_via")
    ctx.trap(f"indirect_{kind}")
    if kind == "_modules":
        return lambda a: f'self._modules["{m.local}"]({a})'
    if kind == "partial":
        ctx.init.append(f"self.{attr} = functools.partial(self.{m.local})")
    elif kind == "bound_forward":
        ctx.init.append(f"self.{attr} = self.{m.local}.forward")
    elif kind == "namespace":
        ctx.init.append(f"self.{attr} = types.SimpleNamespace(mod=self.{m.local})")
        return lambda a: f"self.{attr}.mod({a})"
    elif kind == "dataclass":
        ctx.helper("FuzzBox")
        ctx.init.append(f"self.{attr} = FuzzBox(self.{m.local})")
        return lambda a: f"self.{attr}.mod({a})"
    elif kind == "nested_list":
        ctx.init.append(f"self.{attr} = [[self.{m.local}]]")
        return lambda a: f"self.{attr}[0][0]({a})"
    elif kind == "lambda":
        ctx.init.append(f"self.{attr} = lambda mod, t: mod(t)")
        return lambda a: f"self.{attr}(self.{m.local}, {a})"
    elif kind == "holder":
        ctx.helper("FuzzHolder")
        ctx.init.append(f"self.{attr} = FuzzHolder(self.{m.local})")
    return lambda a: f"self.{attr}({a})"


def emit_unit(ctx: Ctx, inp: str, out: str, mods: list[Mod], style: str | None = None) -> str:
    """Register ``mods`` in one of many styles and emit the forward code that
    runs them in order on ``inp`` into ``out``. Returns the style used."""
    rng = ctx.rng
    has_post = mods[-1].role == "post"
    if style is None:
        names, weights = zip(*STYLES.items())
        style = rng.choices(names, weights)[0]
        if style in ("seq_sub_iter", "class_shadow") and not has_post:
            style = "inline"
    # A BN that never runs may have any channel count; fusedconv must not fold it, nor crash on it.
    if style in ("seq_sub_iter", "class_shadow"):
        last = mods[-1]
        last.dead = True
        if rng.random() < 0.5:
            ch = int(last.ctor.split("(")[1].split(",")[0].rstrip(")"))
            last.ctor = last.ctor.replace(f"({ch}", f"({ch + rng.randint(1, 3)}", 1)
            ctx.trap("dead_bn_wrong_channels")
    _build_locals(ctx, mods)
    for m in mods:
        if getattr(m, "ctor_after", None):
            ctx.init.append(m.ctor_after)
    locals_ = [m.local for m in mods]
    container = ctx.name({"modulelist": "layers", "moduledict": "dict", "moduledict_loop": "dict"}.get(style, "seq"))

    if style in ("sequential", "seq_odict", "seq_sub", "seq_sub_iter", "checkpoint_seq", "checkpoint_sequential"):
        cls = {"seq_sub": "FuzzSeq", "seq_sub_iter": "FuzzSeqIter"}.get(style, "nn.Sequential")
        if style in ("seq_sub", "seq_sub_iter"):
            ctx.helper(cls)
        if style == "seq_sub_iter":
            ctx.trap("sequential_iter_override")
        if style == "checkpoint_sequential" and rng.random() < 0.3:
            cls = ctx.helper("FuzzSeqIter") if mods[-1].role == "post" else "nn.Sequential"
            if cls == "FuzzSeqIter":
                mods[-1].dead = True
                ctx.trap("sequential_iter_override")
        if style == "seq_odict":
            items = ", ".join(f'("{m.local}", {m.local})' for m in mods)
            ctx.init.append(f"self.{container} = {cls}(collections.OrderedDict([{items}]))")
        else:
            ctx.init.append(f"self.{container} = {cls}({', '.join(locals_)})")
        if style == "checkpoint_seq":
            ctx.tags.add("checkpoint")
            ctx.emit(f"{out} = checkpoint(self.{container}, {inp}, use_reentrant=False)")
        elif style == "checkpoint_sequential":
            ctx.tags.add("checkpoint_sequential")
            ctx.emit(f"{out} = checkpoint_sequential(self.{container}, {min(2, len(mods))}, {inp}, "
                     "use_reentrant=False)")
        else:
            ctx.emit(f"{out} = self.{container}({inp})")
        return style
    if style == "seq_sub_getitem":
        ctx.helper("FuzzSeqRev")
        ctx.trap("sequential_getitem_override")
        ctx.init.append(f"self.{container} = FuzzSeqRev({', '.join(reversed(locals_))})")
        expr = inp
        for i in range(len(mods)):
            expr = f"self.{container}[{i}]({expr})"
        ctx.emit(f"{out} = {expr}")
        return style
    if style == "modulelist":
        ctx.tags.add("modulelist")
        ctx.init.append(f"self.{container} = nn.ModuleList([{', '.join(locals_)}])")
        if out != inp:
            ctx.emit(f"{out} = {inp}")
        ctx.emit(f"for m in self.{container}:")
        ctx.emit(f"    {out} = m({out})")
        return style
    if style in ("moduledict", "moduledict_loop"):
        ctx.tags.add("moduledict")
        items = ", ".join(f'"{m.local}": {m.local}' for m in mods)
        ctx.init.append(f"self.{container} = nn.ModuleDict({{{items}}})")
        if style == "moduledict_loop":
            if out != inp:
                ctx.emit(f"{out} = {inp}")
            ctx.emit(f"for key in self.{container}:")
            ctx.emit(f"    {out} = self.{container}[key]({out})")
        else:
            expr = inp
            for m in mods:
                expr = f'self.{container}["{m.local}"]({expr})'
            ctx.emit(f"{out} = {expr}")
        return style

    # attribute styles: every module registered as self.<local>
    for m in mods:
        ctx.init.append(f"self.{m.local} = {m.local}")
    calls = {m.local: (lambda a, name=m.local: f"self.{name}({a})") for m in mods}
    if style == "class_shadow":
        ctx.trap("class_attr_shadows_child")
        ctx.class_attrs.append(f"{mods[-1].local} = nn.Identity()")
    elif style == "getattr":
        layer = next(m for m in mods if m.role == "layer")
        calls[layer.local] = lambda a, name=layer.local: f'getattr(self, "{name}")({a})'
    elif style == "indirect":
        target = rng.choice(mods)
        calls[target.local] = _indirect_call(ctx, target, rng.choice(INDIRECT))
    elif style == "checkpoint_layer":
        ctx.tags.add("checkpoint")
        layer = next(m for m in mods if m.role == "layer")
        calls[layer.local] = lambda a, name=layer.local: f"checkpoint(self.{name}, {a}, use_reentrant=False)"
    if style in ("inline", "getattr", "class_shadow") or (style == "indirect" and rng.random() < 0.5):
        expr = inp
        for m in mods:
            expr = calls[m.local](expr)
        ctx.emit(f"{out} = {expr}")
        return style
    # one statement per module
    cur = inp
    for m in mods:
        ctx.emit(f"{out} = {calls[m.local](cur)}")
        cur = out
        if style == "meta_between" and m.role == "layer":
            ctx.tags.add("metadata_read_between")
            ctx.emit(rng.choice([
                f"n_ = {out}.shape[1]",
                f"size_ = {out}.size()",
                f"{out} = {out} if {out}.dim() > 1 else {out} * 2",
                f"assert {out}.dim() > 1",
            ]))
    return style


# --------------------------------------------------------------------------- blocks


def _is_bn_mods(mods):
    return [m for m in mods if m.role != "layer"]


def block_unit(ctx: Ctx, shape: Shape) -> Shape:
    mods, out = make_unit_mods(ctx, shape)
    emit_unit(ctx, "x", "x", mods)
    ctx.owned = True
    return out


def block_bn_only(ctx: Ctx, shape: Shape) -> Shape:
    """A BN (chain) with no layer next to it in the code."""
    d = shape.d if shape.kind == "sp" else 1
    ch = shape.c if shape.kind != "seq" else shape.s[0]  # BatchNorm1d on (N, L, C) normalises L
    if shape.kind == "seq":
        ctx.trap("bn1d_on_NLC")
    for _ in range(ctx.rng.choice([1, 1, 2])):
        name = ctx.name("bn")
        ctx.init.append(f"self.{name} = {bn_ctor(ctx, d, ch)}")
        ctx.emit(f"x = self.{name}(x)")
    return shape


def block_act(ctx: Ctx, shape: Shape) -> Shape:
    opts = ["x = F.relu(x)", "x = torch.tanh(x)", "x = F.gelu(x)", "x = x * torch.sigmoid(x)", "act"]
    if ctx.owned:
        opts += ["x.relu_()", "x += 1", "x.mul_(0.5)", "act_inplace"]
    line = ctx.rng.choice(opts)
    inplace = line == "act_inplace" or "_(" in line or "+=" in line
    if line in ("act", "act_inplace"):
        name = ctx.name("act")
        ctx.init.append(f"self.{name} = nn.ReLU(inplace={inplace})")
        line = f"x = self.{name}(x)"
    if inplace:
        ctx.tags.add("inplace_op")
    else:
        ctx.owned = True
    ctx.emit(line)
    return shape


def block_residual(ctx: Ctx, shape: Shape) -> Shape:
    if ctx.chance(0.25):
        # trap: the conv's output is read twice (by the BN and by the add)
        mods, _ = make_unit_mods(ctx, shape, preserve=shape.kind == "sp", out_c=shape.c, allow_pre=False, min_post=1)
        layer, bn = mods[0], next(m for m in mods if m.role == "post")
        _build_locals(ctx, [layer, bn])
        for m in (layer, bn):
            if m.ctor_after:
                ctx.init.append(m.ctor_after)
            ctx.init.append(f"self.{m.local} = {m.local}")
        y = ctx.name("y")
        ctx.emit(f"{y} = self.{layer.local}(x)")
        ctx.emit(f"x = self.{bn.local}({y}) + {y}")
        ctx.trap("layer_output_read_twice")
    else:
        y = ctx.name("y")
        mods, _ = make_unit_mods(ctx, shape, preserve=shape.kind == "sp", out_c=shape.c)
        emit_unit(ctx, "x", y, mods)
        ctx.emit(ctx.rng.choice([f"x = x + {y}", f"x = {y} + x", f"x = torch.add(x, {y})"]))
        ctx.tags.add("residual")
    ctx.owned = True
    return shape


def block_cat(ctx: Ctx, shape: Shape) -> Shape:
    outs, names = [], []
    for _ in range(2):
        y = ctx.name("y")
        mods, o = make_unit_mods(ctx, shape, preserve=shape.kind == "sp")
        emit_unit(ctx, "x", y, mods)
        outs.append(o)
        names.append(y)
    ctx.emit(f"x = torch.cat([{', '.join(names)}], dim={-1 if shape.kind == 'flat' and ctx.chance(0.5) else 1})")
    ctx.tags.add("cat")
    ctx.owned = True
    return Shape(shape.kind, sum(o.c for o in outs), shape.s)


def block_meta(ctx: Ctx, shape: Shape) -> Shape:
    """Reads of the tensor's metadata, and reshapes that round-trip."""
    ctx.tags.add("metadata")
    if shape.kind == "sp" and shape.d == 2:
        ctx.emit("B, C, H, W = x.shape")
        ctx.emit(ctx.rng.choice(["x = x.reshape(B, C, H * W).reshape(B, C, H, W)",
                                 "x = x.view(B, -1, H, W)", "x = x * (1.0 + 0.0 * H)",
                                 "x = x.flatten(2).view(B, C, H, W)"]))
    elif shape.kind == "sp":
        ctx.emit("B, C, *S = x.shape")
        ctx.emit(ctx.rng.choice(["x = x.reshape(B, C, -1).reshape(B, C, *S)", "x = x.contiguous()"]))
    else:
        ctx.emit("n_, f_ = x.shape[0], x.shape[-1]")
        ctx.emit("x = x.reshape(x.shape)")
    return shape


def block_branch(ctx: Ctx, shape: Shape) -> Shape:
    """An ``if`` on the shape; both branches keep the shape (only one runs)."""
    dim_size = shape.s[-1] if shape.kind == "sp" else shape.c
    thr = dim_size + ctx.rng.choice([-1, 0, 1])
    ctx.tags.add("shape_branch")
    ctx.emit(f"if x.shape[-1] > {thr}:")
    ctx.level += 1
    mods, _ = make_unit_mods(ctx, shape, preserve=shape.kind == "sp", out_c=shape.c)
    emit_unit(ctx, "x", "x", mods)
    ctx.level -= 1
    ctx.emit("else:")
    ctx.level += 1
    if ctx.chance(0.5):
        mods, _ = make_unit_mods(ctx, shape, preserve=shape.kind == "sp", out_c=shape.c)
        emit_unit(ctx, "x", "x", mods)
    else:
        ctx.emit("x = F.relu(x)")
    ctx.level -= 1
    ctx.owned = True
    return shape


def _plain_layer(ctx: Ctx, shape: Shape, **kw):
    if shape.kind == "sp":
        cls, args, out = conv_ctor(ctx, shape, **kw)
        return f"nn.{cls}({args})", out
    oc = kw.get("out_c") or ctx.rng.randint(1, 12)
    return f"nn.Linear({shape.c}, {oc})", Shape("flat", oc)


def _bn_for(ctx: Ctx, shape: Shape, plain=True):
    return bn_ctor(ctx, shape.d if shape.kind == "sp" else 1, shape.c, plain=plain)


def block_shared(ctx: Ctx, shape: Shape) -> Shape:
    """A layer called twice (or registered at two paths)."""
    conv, _ = _plain_layer(ctx, shape, preserve=True, out_c=shape.c, transposed=False)
    c, b = ctx.name("conv"), ctx.name("bn")
    ctx.init.append(f"self.{c} = {conv}")
    ctx.init.append(f"self.{b} = {_bn_for(ctx, shape)}")
    variant = ctx.rng.randrange(3)
    if variant == 0:
        ctx.emit(f"x = self.{b}(self.{c}(x))")
        ctx.emit(f"x = self.{b}(self.{c}(x))")
    elif variant == 1:
        ctx.emit(f"x = self.{c}(x)")
        ctx.emit(f"x = self.{b}(self.{c}(x))")
    else:
        alias = ctx.name("alias")
        ctx.init.append(f"self.{alias} = self.{c}")
        ctx.emit(f"x = self.{b}(self.{c}(x))")
        ctx.emit(f"x = self.{alias}(x)")
    ctx.trap(f"shared_layer_{variant}")
    ctx.owned = True
    return shape


def block_inplace_trap(ctx: Ctx, shape: Shape) -> Shape:
    """In-place ops on a BN's input (pre-BN) or a layer's output (post-BN) after the BN ran:
    once the BN is an Identity, that tensor IS the BN's output."""
    layer, out = _plain_layer(ctx, shape)
    c, b = ctx.name("conv"), ctx.name("bn")
    ctx.init.append(f"self.{c} = {layer}")
    if ctx.chance(0.5) and ctx.owned:
        ctx.init.append(f"self.{b} = {_bn_for(ctx, shape)}")
        z = ctx.name("z")
        ctx.emit(f"{z} = self.{b}(x)")
        ctx.emit(ctx.rng.choice(["x.relu_()", "x += 1", "x.mul_(2)"]))
        ctx.emit(f"x = self.{c}({z})")
        ctx.trap("inplace_on_bn_input")
    else:
        ctx.init.append(f"self.{b} = {_bn_for(ctx, out)}")
        y, z = ctx.name("y"), ctx.name("z")
        ctx.emit(f"{y} = self.{c}(x)")
        ctx.emit(f"{z} = self.{b}({y})")
        ctx.emit(ctx.rng.choice([f"{y}.relu_()", f"{y} += 1", f"{y}.mul_(2)"]))
        ctx.emit(f"x = {z}")
        ctx.trap("inplace_on_layer_output")
    ctx.owned = True
    return out


def block_global(ctx: Ctx, shape: Shape) -> Shape:
    """A module-level global carries the layer's output (read again later, or not)."""
    layer, out = _plain_layer(ctx, shape)
    c, b, g = ctx.name("conv"), ctx.name("bn"), ctx.name("_STASH")
    ctx.init.append(f"self.{c} = {layer}")
    ctx.init.append(f"self.{b} = {_bn_for(ctx, out)}")
    ctx.globals.append(g)
    ctx.emit(f"{g} = self.{c}(x)")
    ctx.emit(f"x = self.{b}({g})")
    if ctx.chance(0.6):
        ctx.emit(f"x = x + {g}")
        ctx.trap("global_read_again")
    else:
        ctx.tags.add("global_write_only")
    ctx.owned = True
    return out


def block_tied(ctx: Ctx, shape: Shape) -> Shape:
    """Two layers sharing a weight: the same Parameter, or the same storage (whole or a view)."""
    variant = ctx.rng.choice(["same_param", "data", "view"] if shape.kind == "sp" else ["same_param", "data"])
    if variant == "view":
        d = shape.d
        g = ctx.rng.choice([1, shape.c]) if shape.c > 1 else 1
        a, b, ba, bb = ctx.name("conv"), ctx.name("conv"), ctx.name("bn"), ctx.name("bn")
        ctx.init.append(f"self.{a} = nn.Conv{d}d({shape.c}, {shape.c}, 3, padding=1, groups={g})")
        ctx.init.append(f"self.{b} = nn.Conv{d}d({shape.c}, {shape.c}, 1, groups={g})")
        sl = ", ".join(["slice(None), slice(None)"] + ["slice(1, 2)"] * d)
        ctx.init.append(f"self.{b}.weight.data = self.{a}.weight.data[{sl}]")
    else:
        layer, _ = _plain_layer(ctx, shape, preserve=True, out_c=shape.c, transposed=False)
        a, b, ba, bb = ctx.name("conv"), ctx.name("conv"), ctx.name("bn"), ctx.name("bn")
        ctx.init.append(f"self.{a} = {layer}")
        ctx.init.append(f"self.{b} = {layer}")
        if variant == "same_param":
            ctx.init.append(f"self.{b}.weight = self.{a}.weight")
        else:
            ctx.init.append(f"self.{b}.weight.data = self.{a}.weight.data")
    ctx.init.append(f"self.{ba} = {_bn_for(ctx, shape)}")
    ctx.init.append(f"self.{bb} = {_bn_for(ctx, shape)}")
    ctx.emit(f"x = self.{ba}(self.{a}(x))")
    ctx.emit(f"x = self.{bb}(self.{b}(x))" if ctx.chance(0.5) else f"x = self.{b}(x)")
    ctx.trap(f"tied_weight_{variant}")
    ctx.owned = True
    return shape


def block_weight_read(ctx: Ctx, shape: Shape) -> Shape:
    """The layer's weight is read outside its forward."""
    layer, out = _plain_layer(ctx, shape)
    c, b = ctx.name("conv"), ctx.name("bn")
    ctx.init.append(f"self.{c} = {layer}")
    ctx.init.append(f"self.{b} = {_bn_for(ctx, out)}")
    ctx.emit(f"x = self.{b}(self.{c}(x)) * (1.0 + self.{c}.weight.mean())")
    ctx.trap("weight_read_in_forward")
    ctx.owned = True
    return out


def block_observer(ctx: Ctx, shape: Shape) -> Shape:
    """A module whose forward updates its own buffers: a run on example inputs must
    leave them as they were (fusedconv's run may not change the caller's model)."""
    name = ctx.name("observer")
    ctx.helper("FuzzObserver")
    ctx.init.append(f"self.{name} = FuzzObserver()")
    ctx.emit(f"x = self.{name}(x)")
    ctx.trap("observer_buffers")
    return shape


def block_pool(ctx: Ctx, shape: Shape) -> Shape:
    if min(shape.s) < 2:
        return shape
    d = shape.d
    # avg_pool3d has no CPU kernel for float16/bfloat16
    kind = "max" if d == 3 and ctx.dtype in ("float16", "bfloat16") else ctx.rng.choice(["avg", "max"])
    ctx.emit(f"x = F.{kind}_pool{d}d(x, 2)")
    ctx.owned = True
    return Shape("sp", shape.c, tuple(s // 2 for s in shape.s))


def to_flat(ctx: Ctx, shape: Shape) -> Shape:
    d = shape.d
    size = 1
    for s in shape.s:
        size *= s
    if shape.c * size > 96 or ctx.chance(0.4):
        ctx.emit(ctx.rng.choice([f"x = F.adaptive_avg_pool{d}d(x, 1)", "x = x.mean(dim=-1, keepdim=True)"
                                 if d == 1 else f"x = F.adaptive_avg_pool{d}d(x, 1)"]))
        size = 1
        ctx.owned = True
    style = ctx.rng.choice(["torch.flatten(x, 1)", "x.view(x.size(0), -1)", "x.reshape(x.shape[0], -1)",
                            "x.flatten(1)", "module"])
    if style == "module":
        name = ctx.name("flatten")
        ctx.init.append(f"self.{name} = nn.Flatten()")
        ctx.emit(f"x = self.{name}(x)")
    else:
        ctx.emit(f"x = {style}")
    ctx.tags.add("flatten")
    return Shape("flat", shape.c * size)


def seq_linear(ctx: Ctx, shape: Shape) -> Shape:
    """A Linear on (N, L, C), with the BN patterns of sequence models."""
    L = shape.s[0]
    oc = L if ctx.chance(0.4) else ctx.rng.randint(1, 10)  # oc == L: channel counts cannot tell the axes apart
    lin, bn = ctx.name("lin"), ctx.name("bn")
    ctx.init.append(f"self.{lin} = nn.Linear({shape.c}, {oc}, bias={ctx.chance(0.7)})")
    ctx.tags.add("Linear_NLC")
    r = ctx.rng.random()
    if r < 0.35:
        ctx.init.append(f"self.{bn} = {bn_ctor(ctx, 1, L)}")
        ctx.emit(f"x = self.{bn}(self.{lin}(x))")
        ctx.trap("bn1d_on_NLC")
    elif r < 0.6:
        ctx.init.append(f"self.{bn} = {bn_ctor(ctx, 1, oc)}")
        ctx.emit(f"x = self.{bn}(self.{lin}(x).transpose(1, 2)).transpose(1, 2)")
        ctx.tags.add("bn_after_transpose")
    elif r < 0.75 and shape.c != L or r < 0.75 and ctx.chance(0.5):
        ctx.init.append(f"self.{bn} = {bn_ctor(ctx, 1, L)}")
        ctx.emit(f"x = self.{lin}(self.{bn}(x))")
        ctx.trap("pre_bn1d_on_NLC")
    else:
        ctx.emit(f"x = self.{lin}(x)")
    ctx.owned = True
    return Shape("seq", oc, shape.s)


def to_seq(ctx: Ctx, shape: Shape) -> Shape:
    size = 1
    for s in shape.s:
        size *= s
    if size > 32:
        ctx.emit(f"x = F.adaptive_avg_pool{shape.d}d(x, {'2' if shape.d < 3 else '1'})")
        size = 2 ** shape.d if shape.d < 3 else 1
    ctx.emit("x = x.flatten(2).transpose(1, 2)")
    ctx.tags.add("to_tokens")
    return Shape("seq", shape.c, (size,))


SP_BLOCKS = [
    (block_unit, 30), (block_bn_only, 3), (block_act, 8), (block_residual, 5), (block_cat, 3), (block_meta, 3),
    (block_branch, 2), (block_pool, 2), (block_shared, 2), (block_inplace_trap, 2), (block_global, 1),
    (block_tied, 2), (block_weight_read, 1), (block_observer, 1),
]
FLAT_BLOCKS = [(block_observer, 1), (block_unit, 10), (block_act, 3), (block_bn_only, 1), (block_residual, 2), (block_cat, 1),
               (block_meta, 1), (block_shared, 1), (block_inplace_trap, 1), (block_tied, 1)]
SEQ_BLOCKS = [(seq_linear, 6), (block_act, 2), (block_bn_only, 1)]


# --------------------------------------------------------------------------- special models


def overflow_model(ctx: Ctx) -> tuple[Shape, list[str]]:
    """float16 conv -> BN with gamma=1000, var=1e-9, eps=1e-6: BN scale ~1e6, so the folded
    weight overflows float16 while the unfolded model (tiny inputs) stays finite."""
    ctx.dtype = "float16"
    ctx.no_inference_mode = True
    ctx.input_scale = 1e-3
    ctx.trap("float16_overflow")
    shape = Shape("sp", 3, (6, 6))
    ctx.init.append("self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)")
    ctx.init.append("self.bn1 = nn.BatchNorm2d(4, eps=1e-6)")
    ctx.emit("x = self.bn1(self.conv1(x))")
    post = ["model.bn1.weight.fill_(1000.0)", "model.bn1.running_var.fill_(1e-9)",
            "model.bn1.running_mean.zero_()", "model.bn1.bias.zero_()"]
    return shape, post


CORRUPTIONS = ["nan_var", "negative_var", "zero_var_eps0", "inf_mean", "inf_var", "train_mode"]


def corrupt_lines(ctx: Ctx) -> list[str]:
    """Lines for make(): corrupt one BN (chosen at build time, among those with statistics)."""
    kind = ctx.rng.choice(CORRUPTIONS)
    ctx.trap(f"corrupt_{kind}")
    pick = ctx.rng.randrange(1000)
    body = {
        "nan_var": "bn.running_var[0] = float('nan')",
        "negative_var": "bn.running_var[0] = -0.5",
        "zero_var_eps0": "bn.running_var[0] = 0.0; bn.eps = 0.0",
        "inf_mean": "bn.running_mean[-1] = float('inf')",
        "inf_var": "bn.running_var[-1] = float('inf')",
        "train_mode": "bn.train()",
    }[kind]
    return [
        "bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)"
        " and m.running_var is not None and not m.running_var.is_inference()]",
        "if bns:",
        f"    bn = bns[{pick} % len(bns)]",
        f"    {body}",
        f"    bn._fuzz_corrupt = {kind!r}",
    ]


# --------------------------------------------------------------------------- the model


def generate(seed: int) -> tuple[str, list[str]]:
    """Source of one random model file, and its tags."""
    rng = random.Random(seed)
    dtype = rng.choices(["float32", "float64", "float16", "bfloat16"], [85, 5, 5, 5])[0]
    ctx = Ctx(rng, dtype)
    post: list[str] = []
    if rng.random() < 0.01:
        shape, post = overflow_model(ctx)
        start = shape
    else:
        start_kind = rng.choices(["sp", "flat", "seq"], [85, 8, 7])[0]
        if start_kind == "sp":
            d = rng.choices([1, 2, 3], [25, 55, 20])[0]
            lo, hi = START_SIZE[d]
            start = Shape("sp", rng.randint(1, 6), tuple(rng.randint(lo, hi) for _ in range(d)))
        elif start_kind == "flat":
            start = Shape("flat", rng.randint(1, 16))
        else:
            start = Shape("seq", rng.randint(1, 8), (rng.randint(2, 8),))
        shape = start
        n_blocks = rng.choice([1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 6])
        for i in range(n_blocks):
            if shape.kind == "sp" and i > 0 and rng.random() < 0.12:
                shape = to_flat(ctx, shape) if rng.random() < 0.7 else to_seq(ctx, shape)
            table = {"sp": SP_BLOCKS, "flat": FLAT_BLOCKS, "seq": SEQ_BLOCKS}[shape.kind]
            fns, weights = zip(*table)
            shape = rng.choices(fns, weights)[0](ctx, shape)
        if rng.random() < 0.1:
            post += corrupt_lines(ctx)
    if ctx.dtype != "float32":
        ctx.tags.add(f"dtype:{ctx.dtype}")
    return render(seed, ctx, start, post), sorted(ctx.tags)


def render(seed: int, ctx: Ctx, start: Shape, post: list[str]) -> str:
    tags = sorted(ctx.tags)
    parts = [HEADER.format(seed=seed, dtype=ctx.dtype, tags=tags, input_scale=ctx.input_scale,
                           input_shape=start.full())]
    parts += [code.rstrip() + "\n" for code in ctx.helpers.values()]
    for g in ctx.globals:
        parts.append(f"{g} = None\n")
    cls = ["", "class Net(nn.Module):"]
    cls += [f"    {a}" for a in ctx.class_attrs]
    cls += ["", "    def __init__(self):", "        super().__init__()"]
    cls += [f"        {line}" for line in ctx.init]
    cls += ["", "    def forward(self, x):"]
    if ctx.globals:
        cls.append(f"        global {', '.join(ctx.globals)}")
    cls += ctx.fwd
    cls.append("        return x")
    parts.append("\n".join(cls) + "\n")
    post_src = "\n".join(f"        {line}" for line in post) if post else "        pass"
    parts.append(MAKE.format(post=post_src))
    return "\n".join(parts)
