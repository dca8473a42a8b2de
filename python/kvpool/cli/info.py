"""``kvpool info``: versions, the model cache, a model's cache geometry, the device."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvpool.cli.common import (
    EXIT_OK,
    ProgressLine,
    add_model_argument,
    resolve_model_argument,
)


def add_parser(commands: Any) -> None:
    info = commands.add_parser(
        "info",
        help="versions, model cache directory and a model's cache geometry",
        description="Print kvpool's and MLX's versions and a model's cache geometry.",
    )
    add_model_argument(info)
    info.add_argument("--json", action="store_true", help="print JSON on stdout")
    info.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import kvpool
    from kvpool.cache.spec import ModelCacheSpec
    from kvpool.demo import resolve_and_load
    from kvpool.mlx.slab_kernels import device_report
    from kvpool.models import RECIPES, model_cache_dir

    progress = ProgressLine(sys.stderr)
    name = resolve_model_argument(args.model, progress)
    progress.close()
    path, model, _ = resolve_and_load(name)
    spec = ModelCacheSpec.from_model(model)
    data: dict[str, Any] = {
        "kvpool": kvpool.__version__,
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "model_cache_dir": str(model_cache_dir()),
        "recipes": sorted(RECIPES),
        "model": name,
        "model_path": str(path),
        "cache_spec": spec.describe(),
        "bytes_per_block": spec.bytes_per_block,
        "block_tokens": spec.block_tokens,
        **device_report(),
    }
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        width = max(len(key) for key in data)
        for key, value in data.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            print(f"{key:<{width}} {shown}")
    return EXIT_OK


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"
