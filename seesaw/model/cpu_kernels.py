"""A CPU kernel for decode attention over the paged KV cache, built on first use.

The torch reference path gathers every request's keys and values into a padded copy before
attending; this kernel reads them in place through the block table, one request per task. If the build fails (no compiler, no ninja) the engine keeps the reference path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// queries [rows, heads, dim], contiguous; caches [blocks, kv_heads, block_size, dim] with any
// block and head strides (blocks are pages of a larger arena) and contiguous tokens; block_table
// [rows, max_blocks]: row r attends to the first lengths[r] tokens of its blocks. All float32.
torch::Tensor paged_decode(torch::Tensor queries, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_table, torch::Tensor lengths, double scale) {
  TORCH_CHECK(queries.is_contiguous() && block_table.is_contiguous() && lengths.is_contiguous());
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1);
  TORCH_CHECK(k_cache.stride(2) == k_cache.size(3) && v_cache.stride(2) == v_cache.size(3));
  const int64_t rows = queries.size(0), heads = queries.size(1), dim = queries.size(2);
  const int64_t kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t max_blocks = block_table.size(1), max_context = max_blocks * block_size;
  const int64_t group = heads / kv_heads;
  const int64_t k_block = k_cache.stride(0), k_head = k_cache.stride(1);
  const int64_t v_block = v_cache.stride(0), v_head = v_cache.stride(1);
  auto out = torch::empty_like(queries);
  const float* q = queries.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  // One task per request; within it each KV head's tokens are read once, block by block.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(heads * max_context);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = length[r];
      const int64_t* blocks = table + r * max_blocks;
      const float* qr = q + r * heads * dim;
      for (int64_t kv = 0; kv < kv_heads; ++kv) {
        for (int64_t t = 0; t < n; ++t) {
          const float* key = kc + blocks[t / block_size] * k_block + kv * k_head + (t % block_size) * dim;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t head = kv * group + g;
            const float* qh = qr + head * dim;
            float dot = 0.f;
#pragma omp simd reduction(+:dot)
            for (int64_t d = 0; d < dim; ++d) dot += qh[d] * key[d];
            scores[head * max_context + t] = dot * s;
          }
        }
      }
      for (int64_t head = 0; head < heads; ++head) {
        float* sh = scores.data() + head * max_context;
        float top = sh[0];
        for (int64_t t = 1; t < n; ++t) top = std::max(top, sh[t]);
        float total = 0.f;
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) sh[t] = std::exp(sh[t] - top);
        for (int64_t t = 0; t < n; ++t) total += sh[t];
        const float inv = 1.f / total;
        for (int64_t t = 0; t < n; ++t) sh[t] *= inv;
      }
      float* orow = o + r * heads * dim;
      std::fill(orow, orow + heads * dim, 0.f);
      for (int64_t kv = 0; kv < kv_heads; ++kv) {
        for (int64_t t = 0; t < n; ++t) {
          const float* value = vc + blocks[t / block_size] * v_block + kv * v_head + (t % block_size) * dim;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t head = kv * group + g;
            const float p = scores[head * max_context + t];
            float* oh = orow + head * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) oh[d] += p * value[d];
          }
        }
      }
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
    try:
        module = load_inline(
            name=f"seesaw_paged_decode_v2_{capability.lower()}",
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
