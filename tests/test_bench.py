"""The benchmark CLI: record schema, reference check before timing, compare, plot, fla conventions."""

import io
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from rich.console import Console

from mlx_gdn import backends
from mlx_gdn import reference as R
from mlx_gdn.bench import cli
from mlx_gdn.bench.check import Checker
from mlx_gdn.bench.contenders import Contender, discover
from mlx_gdn.bench.contenders_fla import make_fla_contender
from mlx_gdn.bench.shapes import Config, configs, default_sweep, resolve_shapes
from mlx_gdn.testing import tolerance

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hk", "2", "--hv", "4", "--dk", "32", "--dv", "16", "--batch", "1,2", "--tokens", "1,5",
        "--dtype", "float32", "--budget", "0.01", "--min-reps", "2", "--copy-mib", "1", "--no-progress"]


def _quiet():
    return Console(file=io.StringIO(), width=200)


def _counting(name, transform_y=lambda y: y, transform_s=lambda s: s, fail=False):
    """A contender built on the exact ops path, optionally corrupted; counts its calls."""
    import mlx_gdn

    calls = []

    def prepare(s):
        def call():
            calls.append(1)
            if fail:
                raise RuntimeError("kernel exploded")
            y, st = mlx_gdn.gated_delta_rule(s.q, s.k, s.v, s.g, s.beta, s.state, backend="ops")
            return transform_y(y), transform_s(st)

        return call

    return Contender(name=name, family="test", gating="precomputed", prepare=prepare), calls


def _flaky_prepare(prepare):
    """Right on the check's inputs, then binding the timing sets fails (as an allocation might)."""
    seen = []

    def flaky(s):
        seen.append(s)
        if len(seen) > 1:
            raise MemoryError("out of device memory")
        return prepare(s)

    return flaky


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    wrong, wrong_calls = _counting("WRONG state", transform_s=lambda s: s * 1.001)
    raises, _ = _counting("RAISES", fail=True)
    good, good_calls = _counting("GOOD copy")
    flaky = Contender(name="FLAKY", family="test", gating="precomputed",
                      prepare=_flaky_prepare(good.prepare))
    argv = TINY + ["--only", "mlx-gdn ops recurrent fused|mlx-lm default|WRONG|RAISES|GOOD|FLAKY",
                   "--json", str(d / "a.json"), "--plot", str(d / "a.png"), "--md", str(d / "a.md")]
    rec = cli.main(argv, extra_contenders=[wrong, raises, good, flaky], console=_quiet())
    return d, rec, wrong_calls, good_calls


def test_record_schema(tiny_run):
    d, rec, _, _ = tiny_run
    on_disk = json.loads((d / "a.json").read_text())
    assert on_disk["schema"] == cli.SCHEMA
    env = on_disk["environment"]
    for key in ("device", "device_kind", "versions", "platform", "git_commit", "command", "date"):
        assert key in env
    assert env["versions"]["mlx"] == mx.__version__
    assert on_disk["copy_bandwidth"]["GBps"] > 0
    names = {c["name"] for c in on_disk["contenders"]}
    assert {"mlx-gdn ops recurrent fused", "mlx-lm default", "WRONG state", "RAISES"} <= names
    # 2 batch sizes x 2 token counts, every contender once per cell.
    cells = {r["key"] for r in on_disk["results"]}
    assert len(cells) == 4 and len(on_disk["results"]) == 4 * len(names)
    for r in on_disk["results"]:
        assert r["config"]["Hk"] == 2 and r["config"]["Dv"] == 16
        if r["status"] == "ok":
            assert r["time_s"] > 0 and r["reps"] >= 2 and len(r["times_s"]) == r["reps"]
            assert r["time_s"] == pytest.approx(float(np.median(r["times_s"])))
            assert r["GBps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
            assert r["check"]["ok"] and max(r["check"]["y_err"], r["check"]["state_err"]) <= r["check"]["tol"]


def test_baseline_and_speedup(tiny_run):
    _, rec, _, _ = tiny_run
    for key in {r["key"] for r in rec["results"]}:
        cell = {r["contender"]: r for r in rec["results"] if r["key"] == key}
        base = cell["mlx-lm default"]
        assert base["status"] == "ok" and base["speedup"] == pytest.approx(1.0)
        ours = cell["mlx-gdn ops recurrent fused"]
        assert ours["speedup"] == pytest.approx(base["time_s"] / ours["time_s"])


def test_wrong_contender_reported_not_timed(tiny_run):
    _, rec, wrong_calls, good_calls = tiny_run
    wrong = [r for r in rec["results"] if r["contender"] == "WRONG state"]
    assert wrong and all(r["status"] == "wrong" and "time_s" not in r for r in wrong)
    # Only the state was corrupted (by 1e-3): the check must look at the state too.
    assert all(r["check"]["y_err"] < 1e-5 and r["check"]["state_err"] > r["check"]["tol"] for r in wrong)
    assert all("relative error" in r["error"] for r in wrong)
    # Checked once per small instance (T=1 and T=5, B=1 and 2), never called for timing.
    assert len(wrong_calls) == 4
    assert len(good_calls) > 4 * 2  # the same path, uncorrupted, was timed
    flaky = [r for r in rec["results"] if r["contender"] == "FLAKY"]
    assert flaky[0]["check"]["ok"] and flaky[0]["status"] == "error" and "while timing" in flaky[0]["error"]
    raised = [r for r in rec["results"] if r["contender"] == "RAISES"]
    assert all(r["status"] == "error" and "kernel exploded" in r["error"] for r in raised)


def test_plot_and_markdown(tiny_run):
    d, rec, _, _ = tiny_run
    assert (d / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (d / "a.md").read_text()
    assert rec["environment"]["command"] in md and "| WRONG state | wrong |" in md
    assert md.count("| wrong |") == 4


def test_compare(tiny_run, tmp_path):
    d, rec, _, _ = tiny_run
    other = json.loads((d / "a.json").read_text())
    for r in other["results"]:
        if r["status"] == "ok":
            r["time_s"] /= 2
    (tmp_path / "b.json").write_text(json.dumps(other))
    rows = cli.compare(str(d / "a.json"), str(tmp_path / "b.json"), _quiet())
    timed = [r for r in rows if r[4] is not None]
    assert timed and all(r[4] == pytest.approx(2.0) for r in timed)
    # The module entry point prints the same comparison.
    p = subprocess.run([sys.executable, "-m", "mlx_gdn.bench", "--compare", str(d / "a.json"), str(tmp_path / "b.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "2.00" in p.stdout and "mlx-lm default" in p.stdout


def _fake_fla(log_g=True, k_first=True):
    """A stand-in for fla's kernels that follows fla's conventions (or breaks one)."""

    def fn(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel):
        assert output_final_state and not use_qk_l2norm_in_kernel
        h0 = np.swapaxes(initial_state, -1, -2) if k_first else initial_state
        y, s = R.delta_rule(q * scale, k, v, np.exp(g) if log_g else g, beta, h0)
        return y, (np.swapaxes(s, -1, -2) if k_first else s)

    return fn


class _NumpyBridge:
    def to_device(self, x, dtype):
        return np.asarray(x, np.float64)

    def to_numpy(self, x):
        return x

    def sync(self, out):
        pass


@pytest.mark.parametrize("log_g, ok", [(True, True), (False, False)])
def test_fla_conventions(log_g, ok):
    # Dk != Dv, so a state left in the wrong layout cannot pass either.
    cfg = Config("t", 1, 6, 1, 2, 8, 4, "float32")
    cont = make_fla_contender("fake fla", _fake_fla(log_g=log_g), _NumpyBridge())
    v = Checker(seed=3).check(cont, cfg)
    assert v["ok"] is ok, v


def test_gpu_backend_discovery_with_fake(monkeypatch):
    """A GPU backend that appears at run time is found, and shapes it refuses are marked."""
    ops = backends.module("ops")

    class FakeMetal:
        name = "metal"

        @staticmethod
        def available():
            return True

        @staticmethod
        def unavailable_reason():
            return ""

        @staticmethod
        def supports(p, algorithm):
            return algorithm == "recurrent" and p.Dk % 32 == 0

        choose_algorithm = staticmethod(lambda p: "recurrent")
        variants = staticmethod(lambda *args: ())  # no kernels: nothing to try before planning
        run = staticmethod(ops.run)

    real = backends.module
    monkeypatch.setattr(backends, "module", lambda n: FakeMetal if n == "metal" else real(n))
    found = {c.name: c for c in discover()}
    assert "mlx-gdn metal recurrent fused" in found and "mlx-gdn metal chunked precomputed" in found
    ok = Config("t", 1, 3, 2, 4, 32, 16, "float32")
    assert found["mlx-gdn metal recurrent fused"].unsupported(ok) is None
    assert found["mlx-gdn metal chunked fused"].unsupported(ok)
    assert found["mlx-gdn metal recurrent fused"].unsupported(Config("t", 1, 3, 2, 4, 48, 16, "float32"))
    assert Checker(seed=1).check(found["mlx-gdn metal recurrent precomputed"], ok)["ok"]


def test_sweeps_and_shapes():
    gpu, cpu = default_sweep("gpu", False), default_sweep("cpu", True)
    assert gpu["tokens"] == [1, 64, 512, 4096] and gpu["batch"] == [1, 4, 16]
    assert max(cpu["tokens"]) <= 256 and cpu["batch"] == [1]
    assert resolve_shapes(["qwen3.5"], {"hv": 48})[0][1] == (16, 48, 128, 128)
    names = [n for n, _ in resolve_shapes(["all"], {})]
    assert "qwen3.5-hv64" in names and len(names) == len(set(d for _, d in resolve_shapes(["all"], {})))
    with pytest.raises(ValueError, match="multiple"):
        resolve_shapes(["qwen3.5"], {"hk": 5})
    with pytest.raises(ValueError, match="dtype"):
        configs([("x", (1, 1, 8, 8))], [1], [1], ["int8"])
    cs = configs([("x", (1, 1, 8, 8))], [4, 1], [64, 1], ["float32"])
    assert [(c.B, c.T) for c in cs] == [(1, 1), (1, 64), (4, 1), (4, 64)]


def test_tolerance_is_configurable():
    cfg = Config("t", 1, 4, 1, 2, 8, 4, "float32")
    wrong, _ = _counting("off by 1e-3", transform_y=lambda y: y * 1.001)
    assert not Checker(seed=5).check(wrong, cfg)["ok"]
    assert Checker(seed=5, tolerance={"float32": 1e-2}).check(wrong, cfg)["ok"]


def test_stated_path_tolerance_applies_only_where_looser():
    cfg = Config("t", 1, 4, 1, 2, 8, 4, "float32")
    off, _ = _counting("off by 1e-3", transform_y=lambda y: y * 1.001)
    off.meta["tolerance"] = {"float32": 2e-3}
    v = Checker(seed=5).check(off, cfg)
    assert v["ok"] and v["tol"] == 2e-3
    off2, _ = _counting("off by 1e-3, tight statement", transform_y=lambda y: y * 1.001)
    off2.meta["tolerance"] = {"float32": 1e-6}
    assert Checker(seed=5).check(off2, cfg)["tol"] == tolerance("float32")


def test_chunked_ops_contender_states_its_float32_bound():
    from mlx_gdn.ops.chunked import float32_tolerance

    (c,) = [c for c in discover() if c.route == ("ops", "chunked") and c.gating == "fused"]
    assert c.meta["tolerance"] == {"float32": float32_tolerance()}


def test_serving_mode_tiny(tmp_path):
    """--serving: a pooled decode step at two pool sizes and packed prefills, each checked
    against plain per-sequence calls before it is timed."""
    out = tmp_path / "serving.json"
    rec = cli.main(["--serving", "--quick", "--batch", "3", "--pools", "4,64", "--packs", "5+0+1,9+3",
                    "--dims", "1,2,32,16", "--budget", "0.01", "--json", str(out)], console=_quiet())
    rows = rec["results"]
    decode = [r for r in rows if r["mode"] == "decode"]
    prefill = [r for r in rows if r["mode"] == "prefill"]
    assert {r["S"] for r in decode} == {4, 64} and {tuple(r["lens"]) for r in prefill} == {(5, 0, 1), (9, 3)}
    assert {r["contender"] for r in decode} >= {"mlx_gdn state_indices", "mlx_gdn gather+call+scatter"}
    assert all(r["rel_err"] < 1e-4 and r["median_ms"] > 0 and r["reps"] >= 3 for r in rows), rows
    assert json.loads(out.read_text())["schema"] == "mlx-gdn-bench-serving/1"
