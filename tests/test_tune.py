"""python -m mlx_gdn.tune: its measurements land in the tuning file, and algorithm="auto" follows
the file on the device (and versions) it was made for, and only there."""

import io
import json

import mlx.core as mx
import pytest

from mlx_gdn import backends, tune, tuning
from mlx_gdn.sim import simulated_metal
from mlx_gdn.validate import Problem

FAKE_GPU = "gpu Simulated Apple M9"
SHAPE = (1, 2, 32, 8)  # Hk, Hv, Dk, Dv: small, and taken by the Metal recurrent and chunked kernels


@pytest.fixture
def tuning_file(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("MLX_GDN_CACHE", str(path))
    monkeypatch.setattr(tuning, "device_name", lambda: FAKE_GPU)
    tuning.reload()
    yield path
    monkeypatch.undo()
    tuning.reload()


def auto_algorithm(T, dtype=mx.float32):
    p = Problem(1, T, 1, 2, 32, 8, dtype, "scalar", False, True)
    mod, algo = backends.resolve("auto", "auto", p)
    return mod.name, algo


def test_simulated_metal_run_writes_measurements(tuning_file):
    """A real (tiny) tuning run of the Metal backend through the simulator: both algorithms timed at
    every length, and the stored crossover is the one those times give."""
    with simulated_metal():
        entry = tune.run(backend_names=["metal"], dtypes=["float32"], Ts=[1, 8], rounds=1, shape=SHAPE,
                         log=lambda s: None)
        stored = tuning.read(tuning_file)["devices"][FAKE_GPU]
        cell = stored["backends"]["metal"]["float32"]
        assert set(cell["times_ms"]) == {"1", "8"}
        for T, t in cell["times_ms"].items():
            assert set(t) == {"recurrent", "chunked"} and all(v > 0 for v in t.values()), (T, t)
        times = {int(T): t for T, t in cell["times_ms"].items()}
        assert cell["chunked_from_t"] == tune.crossover_from(times) == entry["backends"]["metal"]["float32"]["chunked_from_t"]
        assert stored["mlx"] == mx.__version__ and stored["shape"]["Dk"] == 32
        # auto follows whatever was measured.
        t0 = cell["chunked_from_t"]
        for T in (1, 8):
            want = "chunked" if t0 is not None and T >= t0 else "recurrent"
            assert auto_algorithm(T) == ("metal", want), (T, t0)


def fake_times(backend, shape, B, T, dtype, rounds):
    """Chunked slower below T=8 and faster from there on."""
    return {"recurrent": T * 1e-3, "chunked": 6e-3 + T * 0.2e-3}


def test_tuned_crossover_changes_auto_for_metal(tuning_file, monkeypatch):
    with simulated_metal():
        # Built-in table: Metal never picks the chunked form automatically.
        assert backends.CHUNKED_FROM_T["metal"] is None
        assert auto_algorithm(64) == ("metal", "recurrent")
        monkeypatch.setattr(tune, "time_paths", fake_times)
        tune.run(backend_names=["metal"], dtypes=["float32"], Ts=[1, 2, 4, 8, 16, 64], rounds=1, shape=SHAPE,
                 log=lambda s: None)
        assert tuning.read(tuning_file)["devices"][FAKE_GPU]["backends"]["metal"]["float32"]["chunked_from_t"] == 8
        assert [auto_algorithm(T)[1] for T in (1, 4, 7, 8, 9, 64)] == ["recurrent"] * 3 + ["chunked"] * 3
        # bf16 was not tuned: the built-in table answers for it.
        assert auto_algorithm(64, mx.bfloat16) == ("metal", "recurrent")
        # --show marks the entry as the one in use.
        out = io.StringIO()
        tune.show(out=out)
        assert "applies here" in out.getvalue() and "metal float32: chunked from T=8" in out.getvalue()


def test_tuning_of_other_devices_and_versions_is_ignored(tuning_file, monkeypatch):
    cell = {"metal": {"float32": {"chunked_from_t": 4, "times_ms": {}}}}
    tuning.write_entry({"backends": cell}, device="gpu Another GPU")
    with simulated_metal():
        assert auto_algorithm(64) == ("metal", "recurrent")
        tuning.write_entry({"backends": cell})  # this device now
        assert auto_algorithm(64) == ("metal", "chunked")
        for key, other in (("mlx", "0.0.1"), ("mlx_gdn", "0.0.1")):
            real = tuning.versions()
            monkeypatch.setattr(tuning, "versions", lambda: dict(real, **{key: other}))
            tuning.reload()
            assert auto_algorithm(64) == ("metal", "recurrent"), key
            monkeypatch.setattr(tuning, "versions", lambda: real)
            tuning.reload()
        assert auto_algorithm(64) == ("metal", "chunked")
        # --reset forgets this device only.
        assert tune.main(["--reset"]) == 0
        assert auto_algorithm(64) == ("metal", "recurrent")
        assert "gpu Another GPU" in tuning.read(tuning_file)["devices"]


@pytest.mark.parametrize("backends_field", [None, [1, 2], {"ops": {"float32": {"chunked_from_t": "soon"}}},
                                            {"ops": {"float32": {"chunked_from_t": 0}}}, {"ops": 3}])
def test_unreadable_file_means_defaults(tuning_file, backends_field):
    """An unparsable file, or this device's entry (right versions) with a damaged field."""
    if backends_field is None:
        tuning_file.write_text("{not json")
    else:
        entry = dict(tuning.versions(), backends=backends_field)
        tuning_file.write_text(json.dumps({"format": tuning.FORMAT, "devices": {FAKE_GPU: entry}}))
    tuning.reload()
    assert tuning.crossover("ops", "float32") == (False, None)
    for dtype in (mx.float32, mx.bfloat16):
        name = str(dtype).rsplit(".", 1)[-1]
        assert backends.chunked_from("ops", dtype) == backends.builtin_chunked_from("ops", name)


def test_ladder_and_crossover_rule():
    assert tune.ladder(512, False) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert tune.ladder(128, True) == [1, 4, 16, 64, 128]
    t = lambda r, c: {"recurrent": r, "chunked": c}  # noqa: E731
    # A win at one length followed by a loss at a larger one does not count.
    assert tune.crossover_from({1: t(1, 2), 8: t(2, 1), 64: t(3, 4), 512: t(9, 5)}) == 512
    assert tune.crossover_from({1: t(1, 2), 8: t(2, 1), 64: t(3, 2)}) == 8
    assert tune.crossover_from({1: t(1, 2), 8: t(2, 3)}) is None
    assert tune.crossover_from({1: {"recurrent": 1.0}}) is None
