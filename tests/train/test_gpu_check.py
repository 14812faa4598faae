"""scripts/gpu_check.sh without a GPU (refuses in one line) and its report generator (bench/report.py) on a
small fake pytest-benchmark JSON and JUnit XML."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from bench import report

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_cleanly_without_cuda():
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in done.stderr


def fake_run():
    bench = {"group": "train_step[franka]", "name": "test_train_step[compiled_bf16]",
             "stats": {"min": 0.0123, "mean": 0.0130},
             "extra_info": {"variant": "compiled_bf16", "speedup_vs_original": 7.25}}
    base = {"group": "train_step[franka]", "name": "test_train_step[original_fp32]",
            "stats": {"min": 0.0891, "mean": 0.0943}, "extra_info": {"variant": "original_fp32"}}
    return {"benchmarks": [base, bench]}


def test_report_writes_one_replaced_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nhand-written text\n")
    (tmp_path / "run.json").write_text(json.dumps(fake_run()))
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.kernels.test_attention" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="t" name="b"/><testcase classname="t" name="c"><skipped/></testcase>'
        "</testsuite></testsuites>")
    args = ["--device", "NVIDIA H100 80GB HBM3", "--tests", str(tmp_path / "tests.xml"),
            "--json", str(tmp_path / "run.json"), "--results", str(results)]
    report.main(args)
    first = results.read_text()
    assert first.startswith("# Benchmark results\n\nhand-written text\n")
    assert "NVIDIA H100 80GB HBM3" in first and "1 passed, 1 failed, 1 skipped" in first
    assert "FAILED `tests.kernels.test_attention::test_a`" in first
    row = next(line for line in first.splitlines() if "compiled_bf16]" in line)
    assert "12.300 ms" in row and "7.25" in row
    report.main(args)  # a second run replaces the section instead of adding one
    second = results.read_text()
    assert second.count(report.BEGIN) == 1 and second.count(report.END) == 1
    assert second.startswith("# Benchmark results\n\nhand-written text\n")
