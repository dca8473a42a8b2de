#!/usr/bin/env bash
# Builds and runs the C++ tests of the core (ctest), once per configuration:
#   release    Release build, plus one run of the allocator microbenchmark
#   sanitize   Debug build with ASan + UBSan (KVPOOL_SANITIZE=ON)
#   kernels    the MLX kernel tests, Release and again under ASan + UBSan
#              (needs MLX: $Python_EXECUTABLE, or python3, must import mlx)
# Usage: .ci/cpp_tests.sh [config ...]   (default: all of them)
# To add a configuration, write a config_<name> function and list it in
# ALL_CONFIGS. Build dirs: build/cpp-<name>.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
ALL_CONFIGS=(release sanitize kernels)

# Flags every configuration shares: the core only, no Python, no MLX.
CORE_FLAGS=(
  -DKVPOOL_BUILD_PYTHON=OFF
  -DKVPOOL_BUILD_KERNELS=OFF
  -DKVPOOL_BUILD_TESTS=ON
)

# build_and_test NAME [extra cmake flags...]: configure, build, run ctest.
build_and_test() {
  local name="$1"
  shift
  local dir="$ROOT/build/cpp-$name"
  echo "=== [$name] configure + build in $dir"
  cmake -S "$ROOT" -B "$dir" "${CORE_FLAGS[@]}" "$@"
  cmake --build "$dir" -j "$JOBS"
  echo "=== [$name] ctest"
  ctest --test-dir "$dir" --output-on-failure
}

config_release() {
  build_and_test release -DCMAKE_BUILD_TYPE=Release -DKVPOOL_BUILD_BENCH=ON
  echo "=== [release] bench_block_allocator (smoke run)"
  "$ROOT/build/cpp-release/bench_block_allocator"
}

config_sanitize() {
  # The first sanitizer report aborts the test binary, so ctest fails.
  export ASAN_OPTIONS="${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=1}"
  export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
  build_and_test sanitize -DCMAKE_BUILD_TYPE=Debug -DKVPOOL_SANITIZE=ON
}

config_kernels() {
  local py="${Python_EXECUTABLE:-python3}"
  local mlx_flags=(-DKVPOOL_BUILD_KERNELS=ON -DPython_EXECUTABLE="$py")
  build_and_test kernels -DCMAKE_BUILD_TYPE=Release "${mlx_flags[@]}"
  export ASAN_OPTIONS="${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=1}"
  export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
  build_and_test kernels-sanitize -DCMAKE_BUILD_TYPE=Debug -DKVPOOL_SANITIZE=ON \
    "${mlx_flags[@]}"
}

main() {
  local configs=("$@")
  if [[ ${#configs[@]} -eq 0 ]]; then
    configs=("${ALL_CONFIGS[@]}")
  fi
  for c in "${configs[@]}"; do
    if ! declare -F "config_$c" >/dev/null; then
      echo "unknown config '$c' (known: ${ALL_CONFIGS[*]})" >&2
      exit 2
    fi
    "config_$c"
  done
  echo "=== all C++ configurations passed: ${configs[*]}"
}

main "$@"
