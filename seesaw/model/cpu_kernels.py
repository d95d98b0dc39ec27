"""A CPU kernel for decode attention over the paged KV cache, built on first use.

The torch reference path gathers every request's keys and values into a padded copy before
attending; this kernel reads them in place through the block table, one request per task. If the build fails (no compiler, no ninja) the engine keeps the reference path.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// A block's tokens of one KV head are one contiguous run, but consecutive blocks may lie far
// apart (pages of an arena), where the hardware prefetcher does not follow: ask for the next early.
static inline void prefetch_run(const float* start, int64_t count) {
  for (int64_t i = 0; i < count; i += 16) __builtin_prefetch(start + i);
}

struct Cache {
  const float* data;
  int64_t block_stride, head_stride;
  const float* run(int64_t block, int64_t kv) const { return data + block * block_stride + kv * head_stride; }
};

// One request: every query head walks its KV head's tokens block by block (no division per
// token); the first query head of a group prefetches, the others find the runs in cache. DIM > 0
// fixes the head size at compile time, so a head's output stays in registers across its tokens.
template <int64_t DIM>
static void decode_row(const float* qr, float* out, const Cache& keys, const Cache& values, const int64_t* blocks,
                       int64_t n, int64_t heads, int64_t group, int64_t block_size, int64_t runtime_dim,
                       float scale, float* scores) {
  const int64_t dim = DIM > 0 ? DIM : runtime_dim;
  for (int64_t head = 0; head < heads; ++head) {
    const int64_t kv = head / group;
    const bool leads = head % group == 0;
    const float* qh = qr + head * dim;
    float* sh = scores + head * n;
    for (int64_t j = 0, first = 0; first < n; ++j, first += block_size) {
      const int64_t count = std::min(block_size, n - first);
      if (leads && first + block_size < n) prefetch_run(keys.run(blocks[j + 1], kv), block_size * dim);
      const float* key = keys.run(blocks[j], kv);
      int64_t i = 0;
      for (; i + 4 <= count; i += 4, key += 4 * dim) {  // four independent sums in flight
        float dot0 = 0.f, dot1 = 0.f, dot2 = 0.f, dot3 = 0.f;
#pragma omp simd reduction(+:dot0, dot1, dot2, dot3)
        for (int64_t d = 0; d < dim; ++d) {
          dot0 += qh[d] * key[d];
          dot1 += qh[d] * key[dim + d];
          dot2 += qh[d] * key[2 * dim + d];
          dot3 += qh[d] * key[3 * dim + d];
        }
        sh[first + i] = dot0 * scale;
        sh[first + i + 1] = dot1 * scale;
        sh[first + i + 2] = dot2 * scale;
        sh[first + i + 3] = dot3 * scale;
      }
      for (; i < count; ++i, key += dim) {
        float dot = 0.f;
#pragma omp simd reduction(+:dot)
        for (int64_t d = 0; d < dim; ++d) dot += qh[d] * key[d];
        sh[first + i] = dot * scale;
      }
    }
    float top = sh[0];
    for (int64_t t = 1; t < n; ++t) top = std::max(top, sh[t]);
    float total = 0.f;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) sh[t] = std::exp(sh[t] - top);
    for (int64_t t = 0; t < n; ++t) total += sh[t];
    const float inv = 1.f / total;
    float acc[DIM > 0 ? DIM : 512] = {};
    for (int64_t j = 0, first = 0; first < n; ++j, first += block_size) {
      const int64_t count = std::min(block_size, n - first);
      if (leads && first + block_size < n) prefetch_run(values.run(blocks[j + 1], kv), block_size * dim);
      const float* value = values.run(blocks[j], kv);
      for (int64_t i = 0; i < count; ++i, value += dim) {
        const float p = sh[first + i];
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) acc[d] += p * value[d];
      }
    }
    float* oh = out + head * dim;
    for (int64_t d = 0; d < dim; ++d) oh[d] = acc[d] * inv;
  }
}

// queries [rows, heads, dim], contiguous; caches [blocks, kv_heads, block_size, dim] with any
// block and head strides (blocks are pages of a larger arena) and contiguous tokens; block_table
// [rows, max_blocks]: row r attends to the first lengths[r] tokens of its blocks. All float32.
torch::Tensor paged_decode(torch::Tensor queries, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_table, torch::Tensor lengths, double scale) {
  TORCH_CHECK(queries.is_contiguous() && block_table.is_contiguous() && lengths.is_contiguous());
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1);
  TORCH_CHECK(k_cache.stride(2) == k_cache.size(3) && v_cache.stride(2) == v_cache.size(3));
  const int64_t rows = queries.size(0), heads = queries.size(1), dim = queries.size(2);
  TORCH_CHECK(dim <= 512, "head_dim above 512");
  const int64_t block_size = k_cache.size(2), max_blocks = block_table.size(1);
  const int64_t group = heads / k_cache.size(1);
  const Cache keys{k_cache.data_ptr<float>(), k_cache.stride(0), k_cache.stride(1)};
  const Cache values{v_cache.data_ptr<float>(), v_cache.stride(0), v_cache.stride(1)};
  auto out = torch::empty_like(queries);
  const float* q = queries.data_ptr<float>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  auto row = dim == 64 ? decode_row<64> : dim == 128 ? decode_row<128> : decode_row<0>;
  // One task per request.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(heads * max_blocks * block_size);
    for (int64_t r = begin; r < end; ++r) {
      row(q + r * heads * dim, o + r * heads * dim, keys, values, table + r * max_blocks, length[r], heads, group,
          block_size, dim, s, scores.data());
    }
  });
  return out;
}
"""

PagedDecode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def load_paged_decode() -> PagedDecode | None:
    """Build (or load the cached build of) the kernel; None when it cannot be built here."""
    from torch.utils.cpp_extension import load_inline

    capability = torch.backends.cpu.get_cpu_capability()
    # Fast math lets the compiler vectorize the dot products and exp; attention tolerates the
    # reordered sums (outputs are compared with the reference within 1e-6).
    # OpenMP makes ATen's parallel_for use torch's threads (without it the header runs serially).
    flags = ["-O3", "-ffast-math", "-fopenmp"] + (["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else [])
    # One build per torch install (another venv's build would be rebuilt over, again and again).
    install = hashlib.blake2b(str(Path(torch.__file__).parent).encode(), digest_size=4).hexdigest()
    name = f"seesaw_paged_decode_v8_{capability.lower()}_{install}"
    _remove_stale_lock(name)
    try:
        module = load_inline(
            name=name,
            cpp_sources=_SOURCE,
            functions=["paged_decode"],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as error:
        log.warning("decode attention kernel unavailable, using the torch path: %s", error)
        return None
    return module.paged_decode


STALE_LOCK_S = 600.0  # a build takes about a minute; a lock this old was left by a build that was killed


def _remove_stale_lock(name: str) -> None:
    """torch waits, without limit, for the lock a build holds; a build that was killed leaves it
    behind, so every later start would hang. Remove it once it is clearly stale."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        log.warning("removing %s, left by a kernel build that did not finish", lock)
        lock.unlink(missing_ok=True)
