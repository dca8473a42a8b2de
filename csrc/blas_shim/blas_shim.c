// libkvpool_blas_shim.so: MLX's BLAS/LAPACK imports, sent to scipy-openblas32.
//
// libmlx.so (mlx[cpu] wheel, Linux) imports 3 cblas_* and 22 LAPACK symbols by
// their plain names and lists the wheel's bundled reference BLAS/LAPACK as
// DT_NEEDED. The dynamic linker searches the global scope (RTLD_GLOBAL
// objects) before libmlx's own dependencies, so a library that defines these
// names and is loaded RTLD_GLOBAL before mlx.core wins. scipy-openblas32 has
// them all, but as scipy_<name>; this shim defines the plain names.
//
// Each name is a GNU indirect function (ifunc): when libmlx binds the symbol,
// the dynamic linker calls our resolver, which returns the address of
// scipy_<name> inside OpenBLAS. libmlx then calls OpenBLAS directly: no
// per-call overhead, and no signature written here (Fortran LAPACK routines
// take hidden string-length arguments that a C wrapper would have to forward
// exactly).
//
// Use (kvpool/blas.py does this):
//   1. dlopen the shim RTLD_LOCAL (nothing can bind to it yet),
//   2. kvpool_blas_shim_init("/path/to/libscipy_openblas.so", err, len) -> 0,
//   3. dlopen the shim again with RTLD_NOLOAD | RTLD_GLOBAL (promotes it),
//   4. import mlx.core.
// Binding a symbol before a successful init calls a stub that aborts with the
// symbol's name: there is nothing correct to fall back to from here.

#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KVPOOL_EXPORT __attribute__((visibility("default")))

// Every BLAS/LAPACK symbol that libmlx.so 0.32.4 imports
// (nm -D --undefined-only libmlx.so); tests/integration/test_blas.py checks
// that this list still covers the installed MLX.
#define KVPOOL_BLAS_SYMBOLS(X) \
  X(cblas_cgemm)               \
  X(cblas_dgemm)               \
  X(cblas_sgemm)               \
  X(cgeev_)                    \
  X(cgesdd_)                   \
  X(cheevd_)                   \
  X(dgeev_)                    \
  X(dgeqrf_)                   \
  X(dgesdd_)                   \
  X(dgetrf_)                   \
  X(dgetri_)                   \
  X(dorgqr_)                   \
  X(dpotrf_)                   \
  X(dsyevd_)                   \
  X(dtrtri_)                   \
  X(sgeev_)                    \
  X(sgeqrf_)                   \
  X(sgesdd_)                   \
  X(sgetrf_)                   \
  X(sgetri_)                   \
  X(sorgqr_)                   \
  X(spotrf_)                   \
  X(ssyevd_)                   \
  X(strtri_)

// Prefix of every symbol in scipy-openblas32 (scipy_cblas_sgemm, scipy_sgeev_).
#define KVPOOL_TARGET_PREFIX "scipy_"

typedef void (*kvpool_fn)(void);

enum {
#define X(name) kvpool_index_##name,
  KVPOOL_BLAS_SYMBOLS(X) // no separator: each X(name) ends in a comma
#undef X
  kvpool_num_symbols
};

static const char* const symbol_names_[kvpool_num_symbols] = {
#define X(name) #name,
    KVPOOL_BLAS_SYMBOLS(X)
#undef X
};

// Filled by kvpool_blas_shim_init; all non-null once it returned 0.
static kvpool_fn targets_[kvpool_num_symbols];

static void die_unresolved(const char* name) {
  fprintf(
      stderr,
      "[kvpool blas shim] %s was called before kvpool_blas_shim_init "
      "resolved it; load the shim through kvpool.blas.use_fast_cpu_blas()\n",
      name);
  abort();
}

#define X(name)                                       \
  static void unresolved_##name(void) {               \
    die_unresolved(#name);                            \
  }                                                   \
  static kvpool_fn resolve_##name(void) {             \
    kvpool_fn target = targets_[kvpool_index_##name]; \
    return target ? target : unresolved_##name;       \
  }                                                   \
  KVPOOL_EXPORT void name(void) __attribute__((ifunc("resolve_" #name)));
KVPOOL_BLAS_SYMBOLS(X)
#undef X

// Resolves every symbol against the OpenBLAS at openblas_path (dlopen'ed
// RTLD_NOW | RTLD_GLOBAL; if it is loaded already, this reuses it). Returns 0
// on success; otherwise the number of symbols left unresolved (or -1 if the
// library cannot be opened), with a message in err. All-or-nothing: on
// failure no symbol is resolved.
KVPOOL_EXPORT int
kvpool_blas_shim_init(const char* openblas_path, char* err, size_t err_len) {
  void* lib = dlopen(openblas_path, RTLD_NOW | RTLD_GLOBAL);
  if (lib == NULL) {
    snprintf(err, err_len, "cannot open %s: %s", openblas_path, dlerror());
    return -1;
  }
  kvpool_fn found[kvpool_num_symbols];
  int num_missing = 0;
  for (int i = 0; i < kvpool_num_symbols; ++i) {
    char target_name[64];
    snprintf(
        target_name,
        sizeof target_name,
        "%s%s",
        KVPOOL_TARGET_PREFIX,
        symbol_names_[i]);
    void* address = dlsym(lib, target_name);
    memcpy(&found[i], &address, sizeof address);
    if (address == NULL && num_missing++ == 0) {
      snprintf(
          err, err_len, "%s does not define %s", openblas_path, target_name);
    }
  }
  if (num_missing > 0) {
    dlclose(lib);
    return num_missing;
  }
  memcpy(targets_, found, sizeof targets_);
  return 0;
}

KVPOOL_EXPORT int kvpool_blas_shim_num_symbols(void) {
  return kvpool_num_symbols;
}

KVPOOL_EXPORT const char* kvpool_blas_shim_symbol_name(int i) {
  return (i >= 0 && i < kvpool_num_symbols) ? symbol_names_[i] : NULL;
}
