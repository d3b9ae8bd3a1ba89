"""Bad input to the public ops: a ValueError / TypeError (RuntimeError for autograd misuse) naming the
offending argument, raised before any write, so every buffer is untouched afterwards (DESIGN section 2).

Each case starts from a valid call and changes one argument. Tensors on the "meta" device stand in
for a second device when there is no GPU (they hold no data, so they are not compared afterwards).
"""
import math

import pytest
import torch

import revkernels as rk

SHAPE = (3, 5, 8)
D = SHAPE[-1]
HAS_CUDA = torch.cuda.is_available()


def t(shape=SHAPE, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, device=device).to(dtype)


def shifted_pair(shape=SHAPE):
    """Two views of one storage, one element apart: each partially overlaps the other."""
    base = torch.randn(math.prod(shape) + 1)
    return base[:-1].view(shape), base[1:].view(shape)


def expanded(shape=SHAPE):
    """A stride-0 (expanded) view: writing it would write one element many times."""
    return torch.randn(shape[-1]).expand(shape)


def one_zero(d=D):
    a = torch.rand(d) + 0.5
    a[d // 2] = 0.0
    return a


# ---------------------------------------------------------------- the valid calls and their cases
# An op spec: argument names in call order, which are keyword-only, and a factory of valid arguments.

SPECS = {
    "rev_step": (("p_prev", "p_cur", "f", "a", "c"), ("out",),
                 lambda: dict(p_prev=t(), p_cur=t(), f=t(dtype=torch.bfloat16), a=0.5, c=0.3, out=None)),
    "rev_inverse": (("p_next", "p_cur", "f", "a", "c"), ("out",),
                    lambda: dict(p_next=t(), p_cur=t(), f=t(dtype=torch.bfloat16), a=0.5, c=0.3, out=None)),
    "rev_backward_step": (("A", "B", "f", "gA", "gB", "a", "c"), ("coef_grads", "g_pending"),
                          lambda: dict(A=t(), B=t(), f=t(dtype=torch.bfloat16), gA=t(), gB=t(),
                                       a=torch.rand(D) + 0.5, c=0.3, coef_grads=True, g_pending=t())),
    "coupling_step": (("x", "g", "alpha"), ("out",),
                      lambda: dict(x=t(), g=t(dtype=torch.bfloat16), alpha=0.5, out=None)),
    "coupling_inverse": (("x_new", "g", "alpha"), ("out",),
                         lambda: dict(x_new=t(), g=t(dtype=torch.bfloat16), alpha=0.5, out=None)),
    "coupling_backward_step": (("x", "g", "gx", "alpha"), (),
                               lambda: dict(x=t(), g=t(dtype=torch.bfloat16), gx=t(), alpha=torch.tensor(0.5))),
}
INVERSES = ("rev_inverse", "rev_backward_step", "coupling_inverse", "coupling_backward_step")


def call(name, args):
    pos, kw, _ = SPECS[name]
    return getattr(rk, name)(*(args[k] for k in pos), **{k: args[k] for k in kw})


def first(name):
    return SPECS[name][0][0]


def tensor_args(name):
    pos, kw, make = SPECS[name]
    return [k for k, v in make().items() if isinstance(v, torch.Tensor) or k == "out"]


def coef_names(name):
    return [k for k in SPECS[name][0] if k in ("a", "c", "alpha")]


def put(key, value):
    """A change: args[key] = value(), or value itself when it is not callable (fresh tensors per call)."""
    return lambda a: a.__setitem__(key, value() if callable(value) else value)


def alias(key, source):
    """A change: args[key] = args[source] (after giving source a fresh fp32 tensor)."""
    def change(a):
        a[source] = t()
        a[key] = a[source]
    return change


def overlap(k1, k2):
    """A change: args[k1], args[k2] = two views of one storage, one element apart."""
    return lambda a: a.update(zip((k1, k2), shifted_pair()))


def chain(*changes):
    return lambda a: [ch(a) for ch in changes]


def either(w, o):
    """The message names both buffers."""
    return rf"\b{w}\b.*\b{o}\b|\b{o}\b.*\b{w}\b"


def cases():
    """(op, case id, change(args) -> None, exception, match) for every op: one bad argument each."""
    out = []
    for name in SPECS:
        def add(cid, change, exc, match, name=name):
            out.append((name, cid, change, exc, match))
        x = first(name)
        coefs = coef_names(name)
        make = SPECS[name][2]
        tensors = [k for k in tensor_args(name) if k not in ("out",) + tuple(coefs)]
        others = tensors[1:]
        has_out = "out" in SPECS[name][1]
        outs = ["out"] if has_out else []
        states = [x] + [k for k in ("p_cur", "B") if k in tensors]  # these must share x's dtype

        for k in others + outs:
            dtype = torch.bfloat16 if k in ("f", "g") else torch.float32
            add(f"shape-{k}", put(k, lambda dtype=dtype: t((3, 5, 7), dtype)), ValueError, rf"^{k}\b")
            add(f"device-{k}", put(k, lambda dtype=dtype: t(dtype=dtype, device="meta")), ValueError, rf"^{k}\b")
            if HAS_CUDA:
                add(f"cuda-{k}", put(k, lambda dtype=dtype: t(dtype=dtype, device="cuda")), ValueError, rf"^{k}\b")
        add(f"shape-{others[0]}-broadcastable", put(others[0], lambda: t((1, 5, 8))), ValueError, rf"^{others[0]}\b")
        add(f"shape-{x}", put(x, lambda: t((3, 5, 7))), ValueError, rf"^{others[0]}\b")  # others are judged against x
        for k in states[1:]:
            add(f"dtype-{k}-f64", put(k, lambda: t(dtype=torch.float64)), TypeError, rf"^{k}\b")
            add(f"dtype-{k}-bf16", put(k, lambda: t(dtype=torch.bfloat16)), TypeError, rf"^{k}\b")
        if has_out:
            add("dtype-out", put("out", lambda: t(dtype=torch.bfloat16)), TypeError, r"^out\b")
        if "g_pending" in tensors:  # read in fp32 like gA, but must have gA's dtype
            for cid, dtype in (("f64", torch.float64), ("bf16", torch.bfloat16)):
                add(f"dtype-g_pending-{cid}", put("g_pending", lambda dtype=dtype: t(dtype=dtype)), TypeError,
                    r"^g_pending\b")
        for k in tensors:
            add(f"int-{k}", put(k, lambda: torch.ones(SHAPE, dtype=torch.int32)), TypeError, rf"^{k}\b")
        add(f"bool-{others[0]}", put(others[0], lambda: torch.ones(SHAPE, dtype=torch.bool)), TypeError, rf"^{others[0]}\b")
        add(f"complex-{x}", put(x, lambda: torch.ones(SHAPE, dtype=torch.complex64)), TypeError, rf"^{x}\b")
        add(f"list-{x}", put(x, lambda: t().tolist()), TypeError, rf"^{x}\b")
        add(f"numpy-{others[-1]}", put(others[-1], lambda: t().numpy()), TypeError, rf"^{others[-1]}\b")
        add(f"float-{others[0]}", put(others[0], 1.0), TypeError, rf"^{others[0]}\b")
        if has_out:
            add("list-out", put("out", lambda: t().tolist()), TypeError, r"^out\b")

        for k in coefs:
            for cid, bad, exc in (("str", "0.5", TypeError), ("none", None, TypeError), ("bool", True, TypeError),
                                  ("complex", 1j, TypeError), ("list", [0.5] * D, TypeError),
                                  ("int-tensor", lambda: torch.tensor(1), TypeError),
                                  ("1-elem", lambda: torch.ones(1), ValueError),
                                  ("size", lambda: torch.ones(D - 1), ValueError),
                                  ("2d", lambda: torch.ones(1, D), ValueError),
                                  ("2d-full", lambda: torch.ones(5, D), ValueError),
                                  ("state-shaped", lambda: torch.ones(SHAPE), ValueError),
                                  ("meta", lambda: torch.full((D,), 0.5, device="meta"), ValueError)):
                add(f"{k}-{cid}", put(k, bad), exc, rf"^{k}\b")
        if name in INVERSES:
            k = coefs[0]
            for cid, zero in (("float", 0.0), ("int", 0), ("negzero", -0.0), ("0d", lambda: torch.tensor(0.0)),
                              ("0d-f64", lambda: torch.zeros((), dtype=torch.float64)), ("channel", one_zero)):
                add(f"{k}-zero-{cid}", put(k, zero), ValueError, rf"^{k}\b")

        tensor_coefs = [k for k in coefs if isinstance(make()[k], torch.Tensor)]
        for k in tensors + tensor_coefs:
            add(f"requires-grad-{k}", lambda a, k=k: a[k].requires_grad_(), RuntimeError, rf"^{k}\b")
        add(f"requires-grad-{coefs[0]}-0d", put(coefs[0], lambda: torch.tensor(0.5, requires_grad=True)),
            RuntimeError, rf"^{coefs[0]}\b")
        if has_out:
            add("requires-grad-out", put("out", lambda: t().requires_grad_()), RuntimeError, r"^out\b")
    return out


def aliasing_cases():
    """`out` aliasing the wrong operand, overlapping written buffers, stride-0 outputs."""
    out = []
    for name in ("rev_step", "rev_inverse", "coupling_step", "coupling_inverse"):
        x = first(name)
        reads = [k for k in ("p_cur", "f", "g") if k in SPECS[name][0]]
        for k in reads:
            out.append((name, f"out-is-{k}", alias("out", k), ValueError, rf"^out\b.*\b{k}\b"))
            out.append((name, f"out-views-{k}", chain(alias("out", k), lambda a, k=k: a.__setitem__("out", a[k].view(SHAPE))),
                        ValueError, rf"^out\b.*\b{k}\b"))
            out.append((name, f"out-overlaps-{k}", overlap(k, "out"), ValueError, rf"^out\b.*\b{k}\b"))
        out.append((name, f"out-overlaps-{x}", overlap(x, "out"), ValueError, rf"^out partially overlaps {x}\b"))

        def transposed(a, x=x, reads=tuple(reads)):  # same storage and shape, other strides: not in place
            sq = torch.randn(8, 8)
            a.update({x: sq, "out": sq.t(), **{r: torch.randn(8, 8) for r in reads}})
        out.append((name, f"out-transposed-{x}", transposed, ValueError, rf"^out partially overlaps {x}\b"))
        out.append((name, "out-expanded", put("out", expanded), ValueError, r"^out\b"))
        out.append((name, "out-expanded-in-place", chain(put(x, expanded), lambda a, x=x: a.__setitem__("out", a[x])),
                    ValueError, r"^out\b"))

    b = "rev_backward_step"
    for w, o in (("gA", "gB"), ("A", "B"), ("A", "gA"), ("A", "gB"), ("gA", "f"), ("gB", "B"), ("A", "f"), ("gB", "f")):
        out.append((b, f"{w}-is-{o}", alias(w, o), ValueError, either(w, o)))
    for w, o in (("gA", "gB"), ("A", "B"), ("gB", "A"), ("gA", "B")):
        out.append((b, f"{w}-overlaps-{o}", overlap(w, o), ValueError, either(w, o)))
    for w in ("A", "gA", "gB"):
        out.append((b, f"{w}-expanded", put(w, expanded), ValueError, rf"^{w}\b"))
        out.append((b, f"{w}-is-g_pending", alias(w, "g_pending"), ValueError, either(w, "g_pending")))
        out.append((b, f"{w}-overlaps-g_pending", overlap(w, "g_pending"), ValueError, either(w, "g_pending")))

    c = "coupling_backward_step"
    for w, o in (("gx", "x"), ("gx", "g"), ("x", "g")):
        out.append((c, f"{w}-is-{o}", alias(w, o), ValueError, either(w, o)))
    out.append((c, "gx-overlaps-x", overlap("gx", "x"), ValueError, either("gx", "x")))
    for w in ("x", "gx"):
        out.append((c, f"{w}-expanded", put(w, expanded), ValueError, rf"^{w}\b"))
    return out


ALL = cases() + aliasing_cases()


def snapshot(args):
    """Clones of every inspectable tensor argument (meta tensors hold no data)."""
    return {k: v.detach().clone() for k, v in args.items()
            if isinstance(v, torch.Tensor) and v.device.type != "meta"}


@pytest.mark.parametrize("name, cid, change, exc, match", ALL, ids=[f"{c[0]}-{c[1]}" for c in ALL])
def test_bad_input_is_refused_before_any_write(name, cid, change, exc, match):
    args = SPECS[name][2]()
    change(args)
    before = snapshot(args)
    with pytest.raises(exc, match=match):
        call(name, args)
    for k, v in before.items():
        assert torch.equal(args[k].detach(), v), f"{k} was modified by a refused call"


# ---------------------------------------------------------------- the checks do not refuse good calls

@pytest.mark.parametrize("name", list(SPECS))
def test_valid_call_passes(name):
    args = SPECS[name][2]()
    call(name, args)


@pytest.mark.parametrize("name", list(SPECS))
def test_requires_grad_is_accepted_under_no_grad(name):
    args = SPECS[name][2]()
    for k, v in args.items():
        if isinstance(v, torch.Tensor) and k not in ("out",):
            v.requires_grad_()
    with torch.no_grad():
        call(name, args)


@pytest.mark.parametrize("name", ["rev_step", "rev_inverse", "coupling_step", "coupling_inverse"])
def test_out_may_be_the_in_place_operand_or_a_separate_buffer(name):
    args = SPECS[name][2]()
    x = first(name)
    args["out"] = t()
    assert call(name, args) is args["out"]
    args["out"] = args[x]
    assert call(name, args) is args[x]


def test_read_only_operands_may_alias_each_other():
    """Only written buffers must be disjoint: p_prev and p_cur (or B and f) may share memory."""
    x, f = t(), t()
    rk.rev_step(x, x, f, 0.5, 0.3)
    A, gA, gB, B = t(), t(), t(), t()
    rk.rev_backward_step(A, B, B, gA, gB, 0.5, 0.3)
    rk.rev_backward_step(A, B, B, gA, gB, 0.5, 0.3, g_pending=B)  # g_pending is read only too


@pytest.mark.parametrize("a", [1, -1, 1e-30, torch.tensor(-2.0), torch.full((D,), 1e-3)], ids=str)
def test_nonzero_coefficients_are_accepted_by_the_inverses(a):
    args = SPECS["rev_inverse"][2]()
    args["a"] = a
    call("rev_inverse", args)
