"""The quantized gather: dense caches out of 8-bit and 4-bit slabs vs dense slabs.

A thin script over ``kvpool.benchmarks.quant`` (the same as ``kvpool bench quant``,
without the report):

    python bench/bench_quant.py [--quick] [--json FILE]
"""

from kvpool.benchmarks.runner import script_main

if __name__ == "__main__":
    script_main("quant")
