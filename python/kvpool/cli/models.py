"""``kvpool models``: what models are cached and where; fetch the trained model ahead of time."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvpool.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    ProgressLine,
    error_line,
    mib,
)


def add_parser(commands: Any) -> None:
    models = commands.add_parser(
        "models",
        help="list the cached models and where they are; fetch the trained model ahead of time",
        description=(
            "Without ACTION (or with 'list'): the model cache directory, the trained models "
            "(fetched with pip from the package index, converted once) and the built-in "
            "random-weight recipes, with what is on disk. 'fetch [NAME]' downloads and "
            "converts a trained model now (default: the default model)."
        ),
    )
    models.add_argument("action", nargs="?", choices=("list", "fetch"), default="list")
    models.add_argument("name", nargs="?", metavar="NAME", help="trained model to fetch")
    models.add_argument("--json", action="store_true", help="print JSON on stdout (list)")
    models.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kvpool.pretrained import DEFAULT_MODEL, ensure_trained_model

    if args.action == "fetch":
        progress = ProgressLine(sys.stderr)
        try:
            path = ensure_trained_model(args.name or DEFAULT_MODEL, note=progress.note)
        finally:
            progress.close()
        print(path)
        return EXIT_OK
    if args.name is not None:
        error_line(f"kvpool models: error: 'list' takes no NAME, got {args.name!r}")
        return EXIT_USAGE
    listing = model_listing()
    if args.json:
        print(json.dumps(listing, indent=2))
        return EXIT_OK
    print(f"model cache   {listing['cache_dir']}")
    print("trained models (downloaded with pip from the package index, converted once):")
    for m in listing["trained"]:
        state = "ready" if m["converted"] else "not fetched (kvpool models fetch)"
        default = "  [default]" if m["default"] else ""
        print(f"  {m['name']:<24} {state}{default}")
        if m["converted"]:
            print(f"  {'':<24} {m['path']} ({mib(m['bytes'])})")
        if m["wheel_bytes"]:
            print(f"  {'':<24} wheel {m['wheel']} ({mib(m['wheel_bytes'])})")
    print("built-in recipes (random weights, built on first use):")
    for r in listing["recipes"]:
        where = f"{r['path']} ({mib(r['bytes'])})" if r["built"] else "not built"
        print(f"  {r['name']:<24} {where}")
    print("also: any mlx-lm model directory, or a Hugging Face repo id (owner/name)")
    return EXIT_OK


def model_listing() -> dict[str, Any]:
    """What ``kvpool models`` prints: the cache directory and each model's state on disk."""
    from kvpool.models import RECIPES, model_cache_dir
    from kvpool.pretrained import (
        DEFAULT_MODEL,
        TRAINED_MODELS,
        is_converted,
        trained_model_dir,
        wheel_path,
    )

    def size(path: Path) -> int:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0

    trained = []
    for name, model in sorted(TRAINED_MODELS.items()):
        path, wheel = trained_model_dir(model), wheel_path(model)
        converted = is_converted(model)
        trained.append(
            {
                "name": name,
                "default": name == DEFAULT_MODEL,
                "converted": converted,
                "path": str(path),
                "bytes": size(path) if converted else 0,
                "wheel": str(wheel),
                "wheel_bytes": size(wheel),
                "source": model.requirement,
            }
        )
    recipes = []
    for name in sorted(RECIPES):
        path = model_cache_dir() / name
        built = path.is_dir()
        recipes.append(
            {"name": name, "built": built, "path": str(path), "bytes": size(path) if built else 0}
        )
    return {"cache_dir": str(model_cache_dir()), "trained": trained, "recipes": recipes}
