"""MLX's bundled reference BLAS vs OpenBLAS through kvpool.blas (matmul, prefill, decode).

A thin script over ``kvpool.benchmarks.blas`` (the same as ``kvpool bench blas``, without
the report):

    python bench/bench_blas.py [--quick] [--json FILE]
"""

from kvpool.benchmarks.runner import script_main

if __name__ == "__main__":
    script_main("blas")
