"""Benchmarks of kvpool against the baselines a user would pick instead (``kvpool bench``).

One module per benchmark, each with ``run(quick: bool) -> dict`` returning a JSON-ready
record; :mod:`kvpool.benchmarks.runner` holds the registry and runs them,
:mod:`kvpool.benchmarks.report` writes the markdown table and the plots. Importing this
package imports no MLX: the BLAS must be chosen before MLX loads (``kvpool.blas``).
"""
