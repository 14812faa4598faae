"""kernels/compile_check.py: every shipped kernel compiles for sm_80 and sm_90 without spills.

The check itself runs in a subprocess: under TRITON_INTERPRET=1 (set by tests/conftest.py)
`@triton.jit` returns interpreted functions that cannot be compiled.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from kernels import compile_check
from kernels.compile_specs import SPECS

ROOT = Path(__file__).resolve().parents[2]


def fresh_env() -> dict:
    """A real compiler process: no interpreter (once the interpreter has run in a process, e.g. under
    torch.compile, real compilation there fails with `tl.program_id` left patched)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "kernels"), env.get("PYTHONPATH", "")])
    return env


def run_check(*args):
    return subprocess.run([sys.executable, "-m", "kernels.compile_check", *args], cwd=ROOT, env=fresh_env(),
                          capture_output=True, text=True, timeout=900)


def test_own_kernels_compile_without_spills():
    result = run_check("--modules", "kernels.ln_linear", "kernels.embedding")
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("layernorm_linear", "tiled_embedding"))]
    specs = [SPECS[m]() for m in ("kernels.ln_linear", "kernels.embedding")]
    assert len(rows) == 2 * sum(map(len, specs)), "every kernel x config x target"
    # the fp16/bf16 GEMMs of the fused LayerNorm -> Linear use wgmma on sm_90
    gemms = [r for r in rows if "sm_90" in r and "bwd_dln" not in r and r.startswith("layernorm_linear")
             and " fp32 " not in r]
    assert gemms and all(" yes " in r for r in gemms), "\n".join(gemms)


@pytest.mark.slow
def test_attention_kernels_compile_without_spills():
    """Every attention kernel x shipped config x target: no LOCAL/STACK, shared memory fits, wgmma on sm_90."""
    result = run_check("--modules", "kernels.attention")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("attn_", "rope"))]
    assert len(rows) == 2 * len(SPECS["kernels.attention"]())


def test_module_without_specs_fails():
    result = run_check("--modules", "kernels.no_such_kernel_module", "--targets", "90")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED  kernels.no_such_kernel_module: no compile specs" in result.stdout


def test_kernel_module_that_does_not_import_fails(monkeypatch):
    def broken():
        raise ModuleNotFoundError("No module named 'kernels.attention'")

    monkeypatch.setitem(SPECS, "kernels.attention", broken)
    specs, failed = compile_check.collect_specs(["kernels.attention"])
    assert specs == [] and len(failed) == 1 and "kernels.attention: import failed" in failed[0]


def test_every_triton_module_has_specs():
    triton_modules = {f"kernels.{p.stem}" for p in (ROOT / "kernels").glob("*.py") if "\n@triton.jit\n" in p.read_text()}
    assert triton_modules == set(SPECS)


def test_refuses_to_run_under_the_interpreter():
    assert compile_check.main(["--targets", "90"]) == 2  # conftest set TRITON_INTERPRET=1


def _copy(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)


COMPILE_COPY_KERNEL = """
import json, triton
import test_compile_check
from kernels import compile_check
from kernels.compile_specs import SPECS
fn = triton.runtime.jit.JITFunction(test_compile_check._copy)
spec = {"name": "copy", "fn": fn, "signature": {"X": "*fp32", "Y": "*fp32", "N": "i32", "BLOCK": "constexpr"},
        "constexprs": {"BLOCK": 256}, "expect_wgmma": True}
row = compile_check.compile_one(spec, 90)
print(json.dumps({"problems": row.problems, "reg": row.reg, "local": row.local, "stack": row.stack,
                  "table": compile_check.format_table([row])}))
"""


def test_flags_missing_wgmma_and_reports_resources():
    result = subprocess.run([sys.executable, "-c", COMPILE_COPY_KERNEL], cwd=ROOT, env=fresh_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.splitlines()[-1])
    assert row["problems"] == ["no wgmma in sm_90 PTX"]
    assert row["reg"] > 0 and row["local"] == 0 and row["stack"] == 0
    assert "copy" in row["table"]


def test_bad_spec_is_reported():
    fn = triton.runtime.jit.JITFunction(_copy)
    row = compile_check.compile_one({"name": "copy", "fn": fn, "signature": {"X": "*fp32"}, "constexprs": {}}, 80)
    assert row.problems and "signature lacks" in row.problems[0]
