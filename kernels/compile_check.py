"""Compile every Triton kernel at every shipped configuration for sm_80 and sm_90, without a GPU.

    python -m kernels.compile_check                 # all modules, sm_80 and sm_90
    python -m kernels.compile_check --targets 90    # one target
    python -m kernels.compile_check --modules kernels.embedding

Runs on a CPU-only machine: `triton.compile(ASTSource(fn, signature, constexprs),
target=GPUTarget("cuda", cc, 32))` uses the ptxas shipped in the triton wheel, and the cubin goes
through `triton/backends/nvidia/bin/cuobjdump --dump-resource-usage`. Prints one row per
(kernel, config, target): REG, SHARED (the dynamic shared memory Triton allocates, bytes), LOCAL,
STACK and whether the PTX contains `wgmma`. Exits non-zero if any kernel spills (LOCAL > 0 or
STACK > 0), needs more shared memory than the target has, fails to compile, or is marked
`expect_wgmma` and has no `wgmma` in its sm_90 PTX.

TRITON_INTERPRET must be unset (or 0): under the interpreter `@triton.jit` returns an
interpreted function that cannot be compiled. The tests run this module in a subprocess.

Specs (kernels/compile_specs.py)
--------------------------------
`kernels.compile_specs.SPECS` maps each kernel module to a function returning one dict per
(kernel, shipped configuration). Keys:

    "name":         str   row label, usually the kernel's function name without the leading underscore
    "fn":           the @triton.jit function
    "signature":    dict  every argument of fn, in any order -> a Triton type string:
                          "*fp32" / "*fp16" / "*bf16" / "*i32" ... for pointers, "i32" / "i64" / "fp32"
                          for scalars, "constexpr" for tl.constexpr arguments
    "constexprs":   dict  value of every "constexpr" argument (ints, bools, None, tl.float16 ...)
    "num_warps":    int   optional, default 4
    "num_stages":   int   optional, default 3
    "config":       str   optional label; default: the upper-case constexprs + warps/stages
    "expect_wgmma": bool  optional, default False; if True the sm_90 PTX must contain `wgmma`
    "aligned":      list  optional names of pointer/int arguments assumed divisible by 16
                          (what the launcher sees in practice; enables vectorised code)
    "targets":      tuple optional compute capabilities, default (80, 90)

Example:

    def my_specs():
        from kernels import my_op as M
        return [{"name": "my_fwd", "fn": M._my_fwd_kernel,
                 "signature": {"X": "*fp16", "Out": "*fp16", "n": "i32", "BLOCK": "constexpr"},
                 "constexprs": {"BLOCK": 128}, "num_warps": 4, "expect_wgmma": False}]

A module without specs, a kernel module that is missing or fails to import, fails the run: a
check that silently covers fewer kernels than shipped is no check.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

TARGETS = (80, 90)
# usable shared memory per block (bytes): A100 163 KiB, H100 227 KiB
MAX_SHARED = {80: 166912, 90: 232448}


@dataclasses.dataclass
class Row:
    name: str
    config: str
    target: int
    reg: int = -1
    shared: int = -1
    local: int = -1
    stack: int = -1
    wgmma: bool = False
    problems: list = dataclasses.field(default_factory=list)


def cuobjdump_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """REG/STACK/SHARED/LOCAL of the (single) function in a cubin, via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        found = re.findall(rf"\b{key}:(\d+)", out)
        usage[key] = max(int(v) for v in found) if found else 0
    return usage


def default_config(spec: dict) -> str:
    consts = [f"{k}={v}" for k, v in spec["constexprs"].items() if k.isupper()]
    consts.append(f"w{spec.get('num_warps', 4)}s{spec.get('num_stages', 3)}")
    return ",".join(consts)


def compile_one(spec: dict, cc: int) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget

    row = Row(spec["name"], spec.get("config") or default_config(spec), cc)
    fn = spec["fn"]
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        row.problems.append("interpreted function: unset TRITON_INTERPRET")
        return row
    missing = [a for a in fn.arg_names if a not in spec["signature"]]
    if missing:
        row.problems.append(f"signature lacks {missing}")
        return row
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    try:
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.get("aligned", ())}
        src = triton.compiler.ASTSource(fn, spec["signature"], spec["constexprs"], attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as exc:  # report every failure, keep going
        row.problems.append(f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return row
    usage = resource_usage(kernel.asm["cubin"])
    row.reg, row.local, row.stack = usage["REG"], usage["LOCAL"], usage["STACK"]
    row.shared = usage["SHARED"] + int(kernel.metadata.shared)  # static + Triton's dynamic
    row.wgmma = "wgmma" in kernel.asm["ptx"]
    if row.local > 0 or row.stack > 0:
        row.problems.append("spills (LOCAL/STACK > 0)")
    if row.shared > MAX_SHARED[cc]:
        row.problems.append(f"shared memory {row.shared} > {MAX_SHARED[cc]}")
    if cc == 90 and spec.get("expect_wgmma", False) and not row.wgmma:
        row.problems.append("no wgmma in sm_90 PTX")
    return row


def collect_specs(modules) -> tuple[list, list]:
    """(specs, failures): a module without specs, or one that does not import, is a failure."""
    from kernels.compile_specs import SPECS

    specs, failed = [], []
    for name in modules:
        if name not in SPECS:
            failed.append(f"{name}: no compile specs in kernels/compile_specs.py (known: {', '.join(SPECS)})")
            continue
        try:
            specs.extend(SPECS[name]())
        except Exception as exc:  # ImportError, or anything a broken module raises on import
            failed.append(f"{name}: import failed: {type(exc).__name__}: {exc}")
    return specs, failed


def format_table(rows: list) -> str:
    header = ("kernel", "config", "target", "REG", "SHARED", "LOCAL", "STACK", "wgmma", "status")
    lines = [header]
    for r in rows:
        lines.append((r.name, r.config, f"sm_{r.target}", str(r.reg), str(r.shared), str(r.local),
                      str(r.stack), "yes" if r.wgmma else "no", "; ".join(r.problems) or "ok"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", help="kernel modules (default: all in kernels/compile_specs.py)")
    parser.add_argument("--targets", nargs="+", type=int, default=list(TARGETS))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: TRITON_INTERPRET is set; run it with TRITON_INTERPRET unset", file=sys.stderr)
        return 2

    if not args.modules:
        from kernels.compile_specs import SPECS

        args.modules = list(SPECS)
    specs, failed = collect_specs(args.modules)
    rows = [compile_one(spec, cc) for spec in specs for cc in args.targets if cc in spec.get("targets", TARGETS)]
    print(format_table(rows))
    for note in failed:
        print(f"FAILED  {note}")
    bad = [r for r in rows if r.problems]
    print(f"{len(rows)} compilations, {len(bad)} with problems, {len(failed)} modules failed")
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
