"""python -m mlx_gdn.doctor: every path here against the reference, a JSON report, the exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_gdn import backends, doctor, launch

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_on_this_machine(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "mlx_gdn.doctor", "--quick", "--json", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    for key in ("schema", "mlx_gdn_version", "device", "versions", "platform", "environment", "seed", "tolerance",
                "checks", "timings", "summary", "ok"):
        assert key in rep, key
    assert rep["versions"]["mlx"] and rep["versions"]["python"] and rep["device"] == rep["environment"]["device"]
    assert rep["ok"] and rep["summary"]["failed"] == 0
    checks = rep["checks"]
    assert checks and all(c["ok"] and c["status"] in ("pass", "skipped") for c in checks), \
        [c for c in checks if not c["ok"]]
    ran = [c for c in checks if c["status"] == "pass"]
    assert all(max(c["y_err"], c["state_err"]) < c["tol"] for c in ran)
    assert {c["path"] for c in ran} >= {"decode", "prefill", "chunked"}
    assert {(c["gating"], c["gate"]) for c in ran} >= {("fused", "scalar"), ("precomputed", "scalar"), ("precomputed", "key")}
    assert any(c["masked"] for c in ran) and any(c["options"] for c in ran)
    assert {c["dtype"] for c in ran} == {"float32", "bfloat16"}
    assert "ops" in {c["backend"] for c in ran}
    names = {t["name"] for t in rep["timings"]}
    assert "mlx-gdn gated_delta_update (auto)" in names
    assert all(t["T"] == 1 and t["Hv"] == 32 and t["Dk"] == 128 and t["median_ms"] > 0 for t in rep["timings"])
    assert "passed" in r.stdout


def test_broken_kernel_is_reported_and_fails_the_run(monkeypatch, tmp_path):
    """A kernel that no longer compiles (injected into the simulator's build) is a failed check
    naming the variant, and the exit status is 1; the other variant still passes."""
    real = launch.LaunchSpec.source
    monkeypatch.setattr(launch.LaunchSpec, "source",
                        lambda s: real(s) + ("\nnot C++;\n" if s.name == "gdn_recurrent_decode_rule" else ""))
    backends.clear_plans()
    out = tmp_path / "report.json"
    status = doctor.main(["--quick", "--simulate", "--only", "metal", "--filter", "decode precomputed scalar-gate",
                          "--no-timing", "--json", str(out)])
    assert status == 1
    rep = json.loads(out.read_text())
    assert not rep["ok"] and rep["summary"] == {"passed": 1, "failed": 1, "skipped": 0}, rep["summary"]
    (bad,) = [c for c in rep["checks"] if c["status"] == "fail"]
    assert not bad["masked"] and bad["where"] == "simulator"
    assert "SimCompileError" in bad["error"] and "gdn_recurrent_decode_rule" in bad["error"], bad["error"]
    assert bad["kernels"] and bad["kernels"][0].startswith("gdn_recurrent_decode_rule<")


def test_cases_cover_every_flavour():
    full = doctor.cases("metal", "device", quick=False)
    quick = doctor.cases("metal", "device", quick=True)
    flavour = lambda c: (c.path, c.gating, c.gate, c.masked, c.options)  # noqa: E731
    assert {flavour(c) for c in quick} == {flavour(c) for c in full}
    assert len(full) == 2 * len(quick) and {c.dtype for c in quick} == {"float32", "bfloat16"}
    assert {c.path for c in full} == {"decode", "prefill", "chunked", "layer_step", "layer_step_norm"}
    assert all(c.path == "chunked" for c in doctor.cases("cuda", "simulator", quick=False))
    with pytest.raises(SystemExit):
        doctor.parser().parse_args(["--only", "tpu"])
