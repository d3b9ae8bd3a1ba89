"""The kernels' PTX for an H100 (sm_90), compiled without a GPU: no shared-memory round trip
(bar.sync) and vectorised global accesses, for fp32 and low-precision `f`.

The launches are built by the ops' own argument builders (ops._*_launch) on CPU tensors, so the
compiled kernels are specialised as a launch on a GPU would be (16-byte aligned pointers, unit
channel strides, ALIGN / VEC from the launcher). With a 16-bit `f`, where the layouts of 16- and
32-bit operands can differ, each case is compiled with the autotuner's smallest and largest tile for a
width of 768 channels; with fp32 only, one tile; rows of 100 channels (ALIGN 4) with one tile.
(All nine candidates per case were checked once: the same facts; CI compiles fewer to stay cheap.)
Compilation runs in a subprocess with TRITON_INTERPRET=0 (under the interpreter, which the other
tests use, @triton.jit gives no compilable function).

Run as a script (`python tests/test_ptx.py`) it prints the facts per kernel as JSON lines.
"""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A global access: ld.global / st.global, optional qualifiers, optional .vN, then .bBITS (or .fBITS ...).
ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def access_bits(ptx: str) -> dict:
    """{'ld': sorted widths in bits of every global load, 'st': ... of every global store}."""
    out = {"ld": set(), "st": set()}
    for kind, vec, bits in ACCESS.findall(ptx):
        out[kind].add(int(vec or 1) * int(bits))
    return {k: sorted(v) for k, v in out.items()}


def compile_cases():
    """(name, PTX facts) of every case; runs where TRITON_INTERPRET=0."""
    import torch
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    from revkernels import ops, tiles

    def compile_ptx(family, args, consts, config):
        fn = tiles.KERNELS[family]
        constexprs = {k: v for k, v in {**consts, **config.kwargs}.items() if k in fn.arg_names}
        options = {k: v for k, v in consts.items() if k not in fn.arg_names}
        positional = [n for n in fn.arg_names if n not in constexprs]
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
                continue
            value = args[positional.index(name)]
            # what the launcher would specialise: dtype / int width, 16-divisibility, ints equal to 1
            ty, attr = native_specialize_impl(CUDABackend, value, False, True, True)
            signature[name] = ty
            if ty == "constexpr":
                constexprs[name] = value
            elif attr:
                attrs[(i,)] = CUDABackend.parse_attr(attr)
        src = ASTSource(fn, signature, constexprs, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options=dict(options, num_warps=config.num_warps))
        return kernel.asm["ptx"]

    M = 4096
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

    def t(D, dtype=fp32):
        return torch.empty(M, D, dtype=dtype)

    def channel(D):
        return torch.empty(D)

    builds = []
    for D in (768, 100):
        for fdt in ((fp32, bf16, fp16) if D == 768 else (bf16,)):
            f = fdt.__repr__()[6:]
            builds.append((f"rev_step-{f}-D{D}", ops._three_term_launch(t(D), t(D), t(D), t(D, fdt), channel(D), 0.0,
                                                                          None, 0.3, False)))
            builds.append((f"rev_inverse-{f}-D{D}", ops._three_term_launch(t(D), t(D), t(D), t(D, fdt), None, 0.5,
                                                                             None, 0.3, True)))
            for coef_grads, pending in ((True, True), (False, False)):
                launch, _ = ops._backward_step_launch(t(D), t(D), t(D, fdt), t(D), t(D), t(D) if pending else None,
                                                      t(D, fdt), channel(D), 0.0, None, 0.3, coef_grads)
                builds.append((f"rev_backward_step{'+coef_grads+g_pending' if coef_grads else ''}-{f}-D{D}", launch))
            builds.append((f"coupling_backward_step-{f}-D{D}",
                           ops._coupling_launch(t(D), t(D), t(D, fdt), t(D), None, 0.5, True)))
    cases = []
    for name, (family, _, _, _, D, args, consts) in builds:
        configs = tiles.candidates(D, consts["VEC"], consts.get("COEF_GRADS", False))
        if D != 768:
            configs = configs[:1]
        elif "-bfloat16-" in name:
            configs = [configs[0], configs[-1]]
        else:
            configs = [configs[len(configs) // 2]]
        for config in configs:
            ptx = compile_ptx(family, args, consts, config)
            cases.append(dict(case=name, tile=dict(config.kwargs, num_warps=config.num_warps),
                              VEC=consts["VEC"], ALIGN=consts["ALIGN"],
                              bar_sync=len(re.findall(r"\bbar(?:rier)?\.sync\b", ptx)),
                              shared_stores=len(re.findall(r"\bst\.shared\b", ptx)), **access_bits(ptx)))
    return cases


@pytest.fixture(scope="module")
def cases():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_and_tile_was_compiled(cases):
    names = {c["case"] for c in cases}
    assert len(names) == 20 and len(cases) == 25, sorted(names)


def test_no_shared_memory_round_trip(cases):
    bad = [(c["case"], c["tile"]) for c in cases if c["bar_sync"] or c["shared_stores"]]
    assert not bad, bad


def test_global_accesses_are_vectorised(cases):
    """fp32-only kernels: 128-bit loads and stores. A 16-bit `f`: its loads (and the backward's gf
    stores) 64-bit, the fp32 ones still 128-bit. Rows of 100 channels (ALIGN 4) as well."""
    for c in cases:
        widths = set(c["ld"]) | set(c["st"])
        if "-float32-" in c["case"]:
            assert widths == {128}, c
        else:
            assert widths == {64, 128}, c


if __name__ == "__main__":
    for case in compile_cases():
        print(json.dumps(case))
