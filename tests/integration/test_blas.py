"""kvpool.blas: MLX's BLAS routed to OpenBLAS on request, and only on request.

Which BLAS MLX uses is fixed per process when mlx.core is imported, so every case runs in a
fresh interpreter; this pytest process itself keeps the reference BLAS (the exact-token tests
elsewhere depend on it, see BLAS.md), which the last test checks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvpool.blas import (
    FAST_BLAS_ENV,
    OPENBLAS_VIA_SHIM,
    REFERENCE,
    SHIM_PATH,
    use_fast_cpu_blas,
)
from kvpool.elf import read_dynamic_symbols

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="kvpool.blas changes MLX's BLAS on Linux only"
)

# Runs `body` with every warning recorded, then reports blas_info() and the warnings as the
# last line of stdout (JSON). `body` fills the dict `result`.
_SCRIPT = """\
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = {{}}
{body}
from kvpool.blas import blas_info
result["info"] = blas_info()
result["warnings"] = [f"{{w.category.__name__}}: {{w.message}}" for w in caught]
print(json.dumps(result))
"""

# A 512x512 float32 matmul in MLX, saved to sys.argv[1].
_MATMUL = """\
import numpy as np
import mlx.core as mx
rng = np.random.default_rng(0)
a = rng.standard_normal((512, 512), dtype=np.float32)
b = rng.standard_normal((512, 512), dtype=np.float32)
np.save(sys.argv[1], np.array(mx.array(a) @ mx.array(b)))
"""

_ENABLE = """\
from kvpool.blas import use_fast_cpu_blas
result["enabled"] = [use_fast_cpu_blas(), use_fast_cpu_blas()]
"""


def _run(body: str, *, env: dict[str, str] | None = None, argv: tuple[str, ...] = ()) -> Any:
    script = _SCRIPT.format(body=textwrap.indent(body, "    "))
    full_env = {k: v for k, v in os.environ.items() if k != FAST_BLAS_ENV} | (env or {})
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def matmul_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, np.ndarray]]:
    """{"reference": (report, product), "fast": (report, product)}, one interpreter each."""
    out = tmp_path_factory.mktemp("blas")
    runs = {}
    for name, setup in (("reference", ""), ("fast", _ENABLE)):
        path = out / f"{name}.npy"
        report = _run(setup + _MATMUL, argv=(str(path),))
        runs[name] = (report, np.load(path))
    return runs


def _expected_product() -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512), dtype=np.float32)
    b = rng.standard_normal((512, 512), dtype=np.float32)
    return a.astype(np.float64) @ b.astype(np.float64)


def test_mlx_uses_reference_blas_unless_asked(
    matmul_runs: dict[str, tuple[Any, np.ndarray]],
) -> None:
    report, _ = matmul_runs["reference"]
    assert report["warnings"] == []
    assert report["info"]["blas"] == REFERENCE
    assert report["info"]["shim_loaded"] is False
    assert report["info"]["openblas_threads"] is None
    symbol, _, library = report["info"]["cblas_sgemm"].partition(" in ")
    assert symbol == "cblas_sgemm"
    assert Path(library).parent.name == "mlx_cpu.libs"
    assert Path(library).name.startswith("libblas")


def test_use_fast_cpu_blas_routes_mlx_to_openblas(
    matmul_runs: dict[str, tuple[Any, np.ndarray]],
) -> None:
    report, _ = matmul_runs["fast"]
    assert report["enabled"] == [True, True]  # the second call is a no-op, not a warning
    assert report["warnings"] == []
    assert report["info"]["blas"] == OPENBLAS_VIA_SHIM
    assert report["info"]["shim_loaded"] is True
    assert report["info"]["openblas_threads"] == 1  # kvpool's default, see use_fast_cpu_blas
    symbol, _, library = report["info"]["cblas_sgemm"].partition(" in ")
    assert symbol == "scipy_cblas_sgemm"
    assert Path(library).name == "libscipy_openblas.so"


@pytest.mark.parametrize("name", ["reference", "fast"])
def test_matmul_agrees_with_float64_numpy(
    matmul_runs: dict[str, tuple[Any, np.ndarray]], name: str
) -> None:
    _, product = matmul_runs[name]
    assert product.dtype == np.float32
    # Entries are ~N(0, 512); float32 sums of 512 products are good to ~1e-6 of that.
    np.testing.assert_allclose(product, _expected_product(), rtol=1e-4, atol=1e-3)


def test_openblas_changes_the_last_bits(matmul_runs: dict[str, tuple[Any, np.ndarray]]) -> None:
    # Negative control for the two tests above: the fast run really ran other code (another
    # summation order), it did not just report another name.
    reference = matmul_runs["reference"][1]
    fast = matmul_runs["fast"][1]
    assert not np.array_equal(reference, fast)
    np.testing.assert_allclose(fast, reference, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    ("call", "env", "threads"),
    [
        ("use_fast_cpu_blas()", {"OPENBLAS_NUM_THREADS": "2"}, 2),  # the user's choice stands
        ("use_fast_cpu_blas(num_threads=3)", {"OPENBLAS_NUM_THREADS": "2"}, 3),
        ("use_fast_cpu_blas(); use_fast_cpu_blas(num_threads=2)", {}, 2),
        ("use_fast_cpu_blas(num_threads=2); use_fast_cpu_blas()", {}, 2),  # kept
    ],
)
def test_openblas_thread_count(call: str, env: dict[str, str], threads: int) -> None:
    report = _run(f"from kvpool.blas import use_fast_cpu_blas\n{call}\nimport mlx.core\n", env=env)
    assert report["warnings"] == []
    assert report["info"]["blas"] == OPENBLAS_VIA_SHIM
    assert report["info"]["openblas_threads"] == threads


def test_num_threads_below_one_raises() -> None:
    # Checked before anything is loaded, so this process keeps its BLAS.
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        use_fast_cpu_blas(num_threads=0)


def test_too_late_warns_and_keeps_reference_blas() -> None:
    report = _run("import mlx.core\n" + _ENABLE)
    assert report["enabled"] == [False, False]
    assert len(report["warnings"]) == 2
    assert report["warnings"][0].startswith(
        "RuntimeWarning: kvpool: fast CPU BLAS not enabled: mlx.core is already imported"
    )
    assert report["info"]["blas"] == REFERENCE
    assert report["info"]["shim_loaded"] is False


def test_missing_scipy_openblas32_warns_and_keeps_reference_blas() -> None:
    # None in sys.modules makes `import scipy_openblas32` raise ImportError.
    report = _run("sys.modules['scipy_openblas32'] = None\n" + _ENABLE + "import mlx.core\n")
    assert report["enabled"] == [False, False]
    assert report["warnings"][0].startswith(
        "RuntimeWarning: kvpool: fast CPU BLAS not enabled: scipy-openblas32 is not installed"
    )
    assert report["info"]["blas"] == REFERENCE


def test_not_linux_warns() -> None:
    report = _run("sys.platform = 'darwin'\n" + _ENABLE + "sys.platform = 'linux'\n")
    assert report["enabled"] == [False, False]
    assert report["warnings"][0] == (
        "RuntimeWarning: kvpool: fast CPU BLAS not enabled: it is for Linux only "
        "(this is darwin; MLX on macOS uses Accelerate)"
    )


@pytest.mark.parametrize(
    ("value", "enabled", "blas", "num_warnings"),
    [
        ("1", True, OPENBLAS_VIA_SHIM, 0),
        ("0", False, REFERENCE, 0),
        ("", False, REFERENCE, 0),
        ("yes", False, REFERENCE, 1),  # only "1" enables; anything else is pointed out
    ],
)
def test_env_var_through_maybe_enable_from_env(
    value: str, enabled: bool, blas: str, num_warnings: int
) -> None:
    # Set after `import kvpool` so that only the explicit call sees it.
    body = (
        "import os\n"
        "from kvpool.blas import maybe_enable_from_env\n"
        f"os.environ[{FAST_BLAS_ENV!r}] = {value!r}\n"
        "result['enabled'] = maybe_enable_from_env()\n"
        "import mlx.core\n"
    )
    report = _run(body)
    assert report["enabled"] is enabled
    assert report["info"]["blas"] == blas
    assert len(report["warnings"]) == num_warnings


@pytest.mark.parametrize(("value", "blas"), [("1", OPENBLAS_VIA_SHIM), ("0", REFERENCE)])
def test_env_var_acts_at_import_kvpool(value: str, blas: str) -> None:
    report = _run("import kvpool\nimport mlx.core\n", env={FAST_BLAS_ENV: value})
    assert report["warnings"] == []
    assert report["info"]["blas"] == blas


def test_shim_covers_every_blas_symbol_libmlx_imports() -> None:
    spec = importlib.util.find_spec("mlx")  # finds the package without importing mlx.core
    assert spec is not None and spec.submodule_search_locations is not None
    mlx_dir = Path(next(iter(spec.submodule_search_locations)))
    bundled = [*(mlx_dir.parent / "mlx_cpu.libs").glob("lib*.so*")]
    bundled_defined = set().union(*(read_dynamic_symbols(p).defined for p in bundled))
    # What libmlx takes from the bundled BLAS/LAPACK (not from libc, libstdc++, ...).
    needed = read_dynamic_symbols(mlx_dir / "lib" / "libmlx.so").undefined & bundled_defined
    assert "cblas_sgemm" in needed and "sgeev_" in needed  # the check can fail
    assert needed <= read_dynamic_symbols(SHIM_PATH).defined


def test_this_process_keeps_reference_blas() -> None:
    maps = Path("/proc/self/maps").read_text()
    assert SHIM_PATH.name not in maps
    assert "libscipy_openblas.so" not in maps
