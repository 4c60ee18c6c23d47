"""A non-editable build carries the kernel sources and the simulator runtime."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)]
    # Build offline from the environment's own tools where it has them; otherwise let pip fetch them.
    if all(importlib.util.find_spec(m) is not None for m in ("setuptools", "wheel")):
        cmd.insert(4, "--no-build-isolation")
    subprocess.run(cmd, check=True, cwd=out)
    (whl,) = out.glob("mlx_gdn-*.whl")
    return whl


def test_wheel_carries_kernels(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    kdir = ROOT / "kernels"
    sources = sorted(p.relative_to(kdir).as_posix() for p in kdir.rglob("*") if p.suffix in (".metal", ".h", ".cu", ".cuh"))
    assert sources, "kernels/ holds no kernel sources"
    assert any("/" in s for s in sources), "kernels/chunked/ holds no kernel sources"
    missing = [s for s in sources if f"mlx_gdn/kernels/{s}" not in names]
    assert not missing, f"wheel lacks kernel sources {missing}"
    for sub in ("sim", "bench"):
        runtime = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "mlx_gdn" / sub).glob("*") if p.is_file() and p.suffix != ".pyc")
        lacking = [r for r in runtime if r not in names]
        assert not lacking, f"wheel lacks {lacking}"


def test_wheel_carries_license_headers_and_metadata(wheel):
    zf = zipfile.ZipFile(wheel)
    names = set(zf.namelist())
    licenses = [n for n in names if ".dist-info/" in n and n.rsplit("/", 1)[-1] == "LICENSE"]
    assert licenses, f"wheel lacks LICENSE: {sorted(n for n in names if '.dist-info/' in n)}"
    assert zf.read(licenses[0]).decode() == (ROOT / "LICENSE").read_text()
    assert "Copyright (c) 2026 the mlx-gdn authors" in (ROOT / "LICENSE").read_text()
    # The kernels (one of each kind) and the simulator's headers, where the package looks for them.
    for must in ("mlx_gdn/kernels/recurrent_decode.metal", "mlx_gdn/kernels/cuda_prelude.h",
                 "mlx_gdn/kernels/chunked/common.cuh", "mlx_gdn/kernels/chunked/state_output.cu", "mlx_gdn/sim/runtime.h", "mlx_gdn/sim/cuda_vocab.h"):
        assert must in names, must
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zf.read(meta).decode()
    for line in ("Requires-Python: >=3.10", "Classifier: License :: OSI Approved :: MIT License",
                 "Classifier: Development Status :: 3 - Alpha",
                 "Classifier: Topic :: Scientific/Engineering :: Artificial Intelligence",
                 "Project-URL: Repository, https://github.com/mlx-gdn/mlx-gdn",
                 "Project-URL: Issues, https://github.com/mlx-gdn/mlx-gdn/issues"):
        assert line in text, f"METADATA lacks {line!r}"


def test_installed_loader_finds_kernels(wheel, tmp_path):
    """Unpacked alone (no source tree beside it), the package still finds its kernels."""
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import mlx_gdn.launch as ks, pathlib;"
        "d = ks.kernel_dir(); print(d);"
        "assert pathlib.Path(d).resolve().is_relative_to(pathlib.Path(r'%s').resolve())" % tmp_path
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": ""})
