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


def _within_bounds(c) -> bool:
    """Every error of a check under its bound (the check's tol unless `bounds` names another)."""
    return bool(c["errors"]) and all(e < c.get("bounds", {}).get(k, c["tol"]) for k, e in c["errors"].items())


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
    assert all(_within_bounds(c) for c in ran), [c for c in ran if not _within_bounds(c)]
    assert all(max(c["y_err"], c["state_err"]) < c["tol"] for c in ran if c["path"] in doctor.FORWARD)
    assert {c["path"] for c in ran} >= {"decode", "prefill", "chunked", "backward", "serving_pool", "serving_packed"}
    (bwd,) = [c for c in ran if c["path"] == "backward"]
    assert {f"d{n} directional" for n in doctor.GRADS} <= set(bwd["errors"]), bwd["errors"]
    assert {(c["gating"], c["gate"]) for c in ran} >= \
        {("fused", "scalar"), ("precomputed", "scalar"), ("precomputed", "key")}
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
    # quick: every forward flavour in one dtype, a subset of the others, each path kept
    assert {flavour(c) for c in quick} <= {flavour(c) for c in full}
    fwd = lambda cs: {flavour(c) for c in cs if c.path in doctor.FORWARD}  # noqa: E731
    assert fwd(quick) == fwd(full) and len(full) == 2 * len({flavour(c) for c in full})
    assert len(quick) == len({flavour(c) for c in quick}) and {c.dtype for c in quick} == {"float32", "bfloat16"}
    every = {"decode", "prefill", "chunked", "layer_step", "layer_step_norm", "layer_step_sigmoid_norm",
             "prefill_prep", "gated_norm", "backward", "serving_pool", "serving_steps", "serving_every",
             "serving_packed"}
    assert {c.path for c in full} == every and {c.path for c in quick} == every - {"serving_steps", "serving_every"}
    # Kimi's per-key gates with the fused options, with and without the sigmoid-gated norm
    assert {("layer_step", "key", True, True), ("layer_step_sigmoid_norm", "key", True, True)} <= \
        {(c.path, c.gate, c.masked, c.options) for c in full}
    assert {c.path for c in doctor.cases("ops", "cpu", quick=False)} == \
        {"decode", "prefill", "chunked", "backward", "serving_pool", "serving_steps", "serving_every", "serving_packed"}
    assert {c.path for c in doctor.cases("cuda", "simulator", quick=False)} == {"chunked", "backward", "serving_every"}
    with pytest.raises(SystemExit):
        doctor.parser().parse_args(["--only", "tpu"])


def _sim_run(tmp_path, *args):
    out = tmp_path / "report.json"
    status = doctor.main(["--simulate", "--only", "metal", "--no-timing", "--json", str(out), *args])
    return status, json.loads(out.read_text())


ADDED = "layer_step key|sigmoid_norm|prefill_prep|gated_norm|backward|serving"


def test_added_kernels_under_the_metal_simulator(tmp_path):
    """The quick doctor's fused layer pieces, chunked backward and serving checks run their Metal
    kernels (in the simulator) and pass, each with its errors and the variants it launched."""
    status, rep = _sim_run(tmp_path, "--quick", "--filter", ADDED)
    checks = rep["checks"]
    assert status == 0 and rep["ok"], [(c["name"], c.get("error")) for c in checks if not c["ok"]]
    assert all(c["status"] == "pass" and c["where"] == "simulator" for c in checks), \
        [(c["name"], c["status"], c.get("reason")) for c in checks]
    assert {c["path"] for c in checks} == {"layer_step", "layer_step_sigmoid_norm", "prefill_prep", "gated_norm",
                                           "backward", "serving_pool", "serving_packed"}
    assert {c["dtype"] for c in checks} == {"float32", "bfloat16"}
    for c in checks:
        assert _within_bounds(c), c
        assert c["kernels"], c["name"]
    by = {c["path"]: c for c in checks}
    assert by["layer_step"]["gate"] == "key" and by["layer_step"]["options"] and by["layer_step"]["masked"]
    assert "KEYGATE=true" in by["layer_step"]["kernels"][0] or "key" in by["layer_step"]["kernels"][0]
    assert by["prefill_prep"]["kernels"][0].startswith("gdn_prefill_prep_masked<")
    assert by["gated_norm"]["kernels"][0].startswith("gdn_gated_norm<")
    bwd = by["backward"]
    assert {f"d{n} vs ops" for n in doctor.GRADS} | {f"d{n} directional" for n in doctor.GRADS} == set(bwd["errors"])
    assert [k.split("<")[0] for k in bwd["kernels"]][-2:] == ["gdn_chunked_state_backward", "gdn_chunked_chunk_grads"]
    assert by["serving_pool"]["route"] == "metal recurrent" and "_pool<" in by["serving_pool"]["kernels"][0]
    assert by["serving_packed"]["route"] == "metal packed-chunked"
    assert {"y", "state", "states", "untouched pool rows"} == set(by["serving_packed"]["errors"])
    assert all("varlen" in k for k in by["serving_packed"]["kernels"])


def test_broken_added_kernels_are_reported(monkeypatch, tmp_path):
    """Kernels of the added paths that no longer compile are failed checks naming the variant and
    what backend="auto" runs instead; a backward whose dg is 1% off fails both gradient checks."""
    from mlx_gdn.metal import chunked_backward as kb

    broken = ("gdn_chunked_chunk_grads", "gdn_prefill_prep_masked", "gdn_chunked_state_output_save_varlen_pool")
    real = launch.LaunchSpec.source
    monkeypatch.setattr(launch.LaunchSpec, "source", lambda s: real(s) + ("\nnot C++;\n" if s.name in broken else ""))
    backends.clear_plans()
    status, rep = _sim_run(tmp_path, "--quick", "--filter", "prefill_prep|backward|serving_packed")
    assert status == 1 and not rep["ok"]
    bad = {c["path"]: c for c in rep["checks"] if c["status"] == "fail"}
    assert set(bad) == {"prefill_prep", "backward", "serving_packed"}, rep["summary"]
    for c, name in zip((bad["backward"], bad["prefill_prep"], bad["serving_packed"]), broken):
        assert "SimCompileError" in c["error"] and name in c["error"], c["error"]
        assert any(k.startswith(name + "<") for k in c["kernels"]), c["kernels"]
    assert bad["backward"]["instead"] == "backend='auto': gradients come from the ops chunked backward instead"
    assert "the unfused conv and norms" in bad["prefill_prep"]["instead"]
    assert "the ops backend" in bad["serving_packed"]["instead"]

    monkeypatch.undo()
    backends.clear_plans()
    real_vjp = kb.kernel_vjp

    def off(*args):
        dq, dk, dv, dg, dbeta, ds = real_vjp(*args)
        return dq, dk, dv, dg * 1.01, dbeta, ds

    monkeypatch.setattr(kb, "kernel_vjp", off)
    status, rep = _sim_run(tmp_path, "--quick", "--filter", "backward")
    (c,) = rep["checks"]
    assert status == 1 and c["status"] == "fail", c
    assert c["errors"]["dg vs ops"] > c["tol"] and c["errors"]["dg directional"] > c["tol"], c["errors"]
    assert c["errors"]["dq vs ops"] < c["tol"] and "gdn_chunked_chunk_grads" in c["error"]


def test_fallback_texts_are_the_modules_own():
    """What the report says backend='auto' runs instead is what each module's fallback warns."""
    import inspect

    from mlx_gdn.cuda import chunked_backward as cuda_bwd
    from mlx_gdn.metal import chunked_backward as metal_bwd
    from mlx_gdn import serving
    from mlx_gdn.models import decode_step, prefill_step

    src = {"layer_step": decode_step, "layer_step_norm": decode_step, "layer_step_sigmoid_norm": decode_step,
           "prefill_prep": prefill_step, "gated_norm": prefill_step,
           ("backward", "metal"): metal_bwd, ("backward", "cuda"): cuda_bwd,
           **{path: serving for path in doctor.SERVING}}
    assert set(src) == set(doctor.INSTEAD)
    for key, text in doctor.INSTEAD.items():
        assert text in inspect.getsource(src[key]), key
