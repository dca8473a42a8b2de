"""Fast CPU matmuls on Linux: route MLX's BLAS calls to OpenBLAS (scipy-openblas32).

The ``mlx[cpu]`` wheel for Linux calls ``cblas_sgemm`` (and 24 other BLAS/LAPACK routines) in
the reference netlib BLAS it bundles: a float32 1024x1024 matmul takes about 0.4-0.85 s, ten
to twenty times what OpenBLAS takes. ``libmlx.so`` imports those routines by name, and the
dynamic linker looks names up in the global scope (libraries loaded ``RTLD_GLOBAL``) before
libmlx's own dependencies. So a library defining them that is loaded ``RTLD_GLOBAL`` before
``mlx.core`` is imported takes their place. ``scipy-openblas32`` ships OpenBLAS with every
name prefixed (``scipy_cblas_sgemm``); kvpool's shim, ``libkvpool_blas_shim.so``, defines the
plain names and binds each to its ``scipy_`` twin (see ``csrc/blas_shim/blas_shim.c``).

Binding happens once, when ``mlx.core`` is imported (Python loads extensions with
``RTLD_NOW``), so the choice is per process and cannot be changed afterwards::

    import kvpool.blas
    kvpool.blas.use_fast_cpu_blas()   # before anything imports mlx
    import mlx.core as mx             # float32 matmuls now run in OpenBLAS

or ``KVPOOL_FAST_BLAS=1`` in the environment, acted on by ``import kvpool``. Nothing in the
library switches BLAS unasked. OpenBLAS sums in another order than the reference BLAS, so
results differ in the last bits (see BLAS.md): exact-token tests keep the reference BLAS.
bfloat16/float16 matmuls do not go through BLAS and are not affected.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from kvpool import _blocks
from kvpool.elf import relocation_offsets

__all__ = [
    "ACCELERATE",
    "FAST_BLAS_ENV",
    "NOT_LOADED",
    "OPENBLAS_THREADS_ENV",
    "OPENBLAS_VIA_SHIM",
    "REFERENCE",
    "SHIM_PATH",
    "blas_info",
    "maybe_enable_from_env",
    "use_fast_cpu_blas",
]

FAST_BLAS_ENV = "KVPOOL_FAST_BLAS"
# Installed beside the compiled extensions (in an editable install too, where this file is not)
SHIM_PATH = Path(_blocks.__file__).resolve().parent / "libkvpool_blas_shim.so"

# What blas_info()["blas"] says.
OPENBLAS_VIA_SHIM = "openblas (scipy-openblas32 via kvpool shim)"
REFERENCE = "reference (bundled with mlx)"
ACCELERATE = "accelerate (macOS)"
NOT_LOADED = "none yet (mlx.core not loaded)"

# The symbol whose binding in libmlx.so blas_info() inspects: every float32 matmul calls it.
_PROBE_SYMBOL = "cblas_sgemm"
_RTLD_DI_LINKMAP = 2  # <dlfcn.h>

OPENBLAS_THREADS_ENV = "OPENBLAS_NUM_THREADS"

# OpenBLAS, once the shim routes MLX to it (never unloaded).
_openblas: ctypes.CDLL | None = None


def use_fast_cpu_blas(num_threads: int | None = None) -> bool:
    """Make MLX's float32 matmuls (and its CPU LAPACK routines) run in OpenBLAS. Linux only.

    Must run before ``mlx.core`` is first imported in this process. Returns True if MLX will
    use OpenBLAS (also when it already was enabled); otherwise emits a :class:`RuntimeWarning`
    saying why (not Linux, mlx already loaded, scipy-openblas32 or the shim missing or
    unusable) and returns False, leaving MLX on its bundled reference BLAS.

    ``num_threads`` is OpenBLAS's thread count; None means ``$OPENBLAS_NUM_THREADS`` if set,
    else 1. One, not one per core, because OpenBLAS's workers spin between calls: a decode
    step makes ~200 small matmuls, and whenever a worker has lost its core (to MLX, or to
    another process) the call waits a scheduler time slice. On the 2-core dev box, with other
    processes running, 2 threads made decode steps up to 12x slower than the reference BLAS
    (1 thread: 1.1-1.3x faster). A repeated call only changes the thread count, if given.
    """
    global _openblas
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if _openblas is not None:
        if num_threads is not None:
            _set_num_threads(_openblas, num_threads)
        return True
    if sys.platform != "linux":
        accelerate = "; MLX on macOS uses Accelerate" if sys.platform == "darwin" else ""
        return _refuse(f"it is for Linux only (this is {sys.platform}{accelerate})")
    if "mlx.core" in sys.modules or _loaded_path("libmlx.so") is not None:
        return _refuse(
            "mlx.core is already imported (MLX binds its BLAS calls when it is loaded, here "
            "to the reference BLAS bundled with mlx); call use_fast_cpu_blas() (or set "
            f"{FAST_BLAS_ENV}=1) before anything imports mlx"
        )
    try:
        import scipy_openblas32
    except ImportError as e:
        return _refuse(f"scipy-openblas32 is not installed ({e}); pip install scipy-openblas32")
    try:
        lib_dir = Path(scipy_openblas32.get_lib_dir())
        openblas_path = lib_dir / scipy_openblas32.get_library(fullname=True)
    except (OSError, IndexError) as e:  # IndexError: no libscipy_openblas* in lib_dir
        return _refuse(f"scipy-openblas32 has no usable library ({type(e).__name__}: {e})")
    if not SHIM_PATH.is_file():
        return _refuse(f"kvpool was built without its BLAS shim ({SHIM_PATH} does not exist)")
    try:
        openblas = ctypes.CDLL(str(openblas_path), mode=os.RTLD_GLOBAL)
        # Loaded local first: nothing can bind to the shim before its symbols are resolved.
        shim = ctypes.CDLL(str(SHIM_PATH), mode=os.RTLD_LOCAL)
        shim.kvpool_blas_shim_init.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
        shim.kvpool_blas_shim_init.restype = ctypes.c_int
        err = ctypes.create_string_buffer(512)
        if shim.kvpool_blas_shim_init(os.fsencode(openblas_path), err, len(err)) != 0:
            return _refuse(f"the BLAS shim cannot use {openblas_path}: {err.value.decode()}")
        # Promote the already loaded shim to the global scope, where libmlx.so will find it.
        ctypes.CDLL(str(SHIM_PATH), mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    except OSError as e:
        return _refuse(f"loading the BLAS shim or OpenBLAS failed: {e}")
    _openblas = openblas
    _set_num_threads(openblas, num_threads)
    return True


def _set_num_threads(openblas: ctypes.CDLL, num_threads: int | None) -> None:
    if num_threads is None:
        if OPENBLAS_THREADS_ENV in os.environ:
            return  # OpenBLAS read it when it was loaded
        num_threads = 1
    openblas.scipy_openblas_set_num_threads(ctypes.c_int(num_threads))


def maybe_enable_from_env() -> bool:
    """Call :func:`use_fast_cpu_blas` if ``KVPOOL_FAST_BLAS=1``; ``import kvpool`` runs this.

    Unset, empty or ``0`` leaves BLAS alone (False); any other value than ``1`` warns.
    """
    value = os.environ.get(FAST_BLAS_ENV, "")
    if value == "1":
        return use_fast_cpu_blas()
    if value not in ("", "0"):
        warnings.warn(
            f"kvpool: {FAST_BLAS_ENV}={value!r} is ignored; set it to 1 to enable OpenBLAS "
            "or 0 to keep MLX's bundled BLAS",
            RuntimeWarning,
            stacklevel=2,
        )
    return False


def blas_info() -> dict[str, Any]:
    """Which BLAS MLX's float32 matmuls run in, in this process, right now. Never imports mlx.

    Truthful by construction: it reads the address the dynamic linker bound ``libmlx.so``'s
    ``cblas_sgemm`` slot to and asks which library holds it. Keys:

    - ``blas``: :data:`OPENBLAS_VIA_SHIM`, :data:`REFERENCE`, :data:`ACCELERATE`,
      :data:`NOT_LOADED`, ``"other (<library>)"``, or ``"unknown (<why>)"``;
    - ``cblas_sgemm``: ``"<symbol> in <library path>"`` that libmlx calls, or None;
    - ``mlx_loaded``, ``shim_loaded``: whether ``libmlx.so`` / the shim are in this process;
    - ``openblas_threads``: OpenBLAS's thread count when MLX calls OpenBLAS, else None.
    """
    if sys.platform == "darwin":
        return {
            "blas": ACCELERATE,
            "cblas_sgemm": None,
            "mlx_loaded": "mlx.core" in sys.modules,
            "shim_loaded": False,
            "openblas_threads": None,
        }
    libmlx = _loaded_path("libmlx.so")
    info: dict[str, Any] = {
        "blas": NOT_LOADED,
        "cblas_sgemm": None,
        "mlx_loaded": libmlx is not None,
        "shim_loaded": _loaded_path(SHIM_PATH.name) is not None,
        "openblas_threads": None,
    }
    if sys.platform != "linux":
        info["blas"] = f"unknown (not inspected on {sys.platform})"
    elif libmlx is not None:
        try:
            symbol, library = _bound_target(libmlx, _PROBE_SYMBOL)
        except (OSError, ValueError, AttributeError) as e:
            info["blas"] = f"unknown ({e})"
        else:
            info["cblas_sgemm"] = f"{symbol} in {library}"
            info["blas"] = _describe(library, shim_loaded=info["shim_loaded"])
            if library.name.startswith("libscipy_openblas"):
                info["openblas_threads"] = _openblas_threads(library)
    return info


def _openblas_threads(library: Path) -> int | None:
    try:
        openblas = ctypes.CDLL(str(library), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        return int(openblas.scipy_openblas_get_num_threads())
    except (OSError, AttributeError):
        return None


def _refuse(reason: str) -> bool:
    warnings.warn(f"kvpool: fast CPU BLAS not enabled: {reason}", RuntimeWarning, stacklevel=3)
    return False


def _describe(library: Path, *, shim_loaded: bool) -> str:
    if library.name.startswith("libscipy_openblas"):
        return OPENBLAS_VIA_SHIM if shim_loaded else f"openblas ({library})"
    # auditwheel puts the bundled netlib BLAS next to mlx: mlx_cpu.libs/libblas-<hash>.so.3
    if library.name.startswith("libblas") and library.parent.name.startswith("mlx"):
        return REFERENCE
    return f"other ({library})"


def _loaded_path(file_name: str) -> Path | None:
    """The path of the loaded library called ``file_name``, from /proc/self/maps, or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]).name == file_name:
            return Path(fields[5])
    return None


class _DlInfo(ctypes.Structure):
    _fields_ = (
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    )


def _bound_target(library: Path, symbol: str) -> tuple[str, Path]:
    """(symbol name, library path) of the function ``library``'s slot for ``symbol`` holds."""
    offsets = relocation_offsets(library, [symbol])
    if symbol not in offsets:
        raise ValueError(f"{library} has no relocation for {symbol}")
    libdl = _libdl()
    handle = ctypes.CDLL(str(library), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    link_map = ctypes.c_void_p()
    if libdl.dlinfo(ctypes.c_void_p(handle._handle), _RTLD_DI_LINKMAP, ctypes.byref(link_map)):
        raise OSError(f"dlinfo failed for {library}")
    assert link_map.value is not None  # dlinfo succeeded
    load_address = ctypes.c_size_t.from_address(link_map.value).value  # link_map.l_addr
    target = ctypes.c_void_p.from_address(load_address + offsets[symbol]).value
    dl_info = _DlInfo()
    if target is None or not libdl.dladdr(ctypes.c_void_p(target), ctypes.byref(dl_info)):
        raise ValueError(f"{symbol} slot of {library} holds {target}, in no loaded library")
    if dl_info.dli_fname is None:
        raise ValueError(f"{symbol} slot of {library} holds {target:#x}, in no named library")
    found = Path(os.fsdecode(dl_info.dli_fname)).resolve()
    if found.name == library.name:
        # Lazy binding (LD_BIND_NOW unset and mlx loaded without RTLD_NOW): not bound yet.
        raise ValueError(f"{symbol} in {library} is not bound yet (lazy binding)")
    name = dl_info.dli_sname.decode() if dl_info.dli_sname else "?"
    return name, found


def _libdl() -> ctypes.CDLL:
    # glibc >= 2.34 has dlinfo/dladdr in libc; older ones in libdl (libdl.so.2 has them in both).
    return ctypes.CDLL("libdl.so.2")
