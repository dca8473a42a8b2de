"""EXP-006 and the reconstruct sweep: gather of pool blocks vs memcpy and mx.concatenate.

A thin script over ``kvpool.benchmarks.reconstruct`` (the same as ``kvpool bench
reconstruct``, without the report):

    python bench/bench_reconstruct.py [--quick] [--json FILE]
"""

from kvpool.benchmarks.runner import script_main

if __name__ == "__main__":
    script_main("reconstruct")
