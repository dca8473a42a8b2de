"""Save and load of an agent's cache file vs raw file I/O of the same bytes.

A thin script over ``kvpool.benchmarks.persist`` (the same as ``kvpool bench persist``,
without the report):

    python bench/bench_persist.py [--quick] [--json FILE]
"""

from kvpool.benchmarks.runner import script_main

if __name__ == "__main__":
    script_main("persist")
