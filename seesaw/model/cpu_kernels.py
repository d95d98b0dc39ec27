"""A CPU kernel for decode attention over the paged KV cache, built on first use.

The torch reference path gathers every request's keys and values into a padded copy before
attending; this kernel reads them in place through the slot table, one request per task. If the build fails (no compiler, no ninja) the engine keeps the reference path.
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
#include <limits>
#include <vector>

// queries [rows, heads, dim]; caches [slots, kv_heads, dim]; slots [rows, max_context] (row r
// attends to its first lengths[r] entries). All float32 and contiguous.
torch::Tensor paged_decode(torch::Tensor queries, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor slots, torch::Tensor lengths, double scale) {
  const int64_t rows = queries.size(0), heads = queries.size(1), dim = queries.size(2);
  const int64_t kv_heads = k_cache.size(1), max_context = slots.size(1);
  const int64_t group = heads / kv_heads;
  auto out = torch::empty_like(queries);
  const float* q = queries.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  // One task per request: every slot row (all KV heads) is read once, in block order.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(heads * max_context);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = length[r];
      const float* qr = q + r * heads * dim;
      for (int64_t t = 0; t < n; ++t) {
        const float* key_row = kc + slot[r * max_context + t] * kv_heads * dim;
        for (int64_t head = 0; head < heads; ++head) {
          const float* qh = qr + head * dim;
          const float* key = key_row + (head / group) * dim;
          float dot = 0.f;
#pragma omp simd reduction(+:dot)
          for (int64_t d = 0; d < dim; ++d) dot += qh[d] * key[d];
          scores[head * max_context + t] = dot * s;
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
      for (int64_t t = 0; t < n; ++t) {
        const float* value_row = vc + slot[r * max_context + t] * kv_heads * dim;
        for (int64_t head = 0; head < heads; ++head) {
          const float p = scores[head * max_context + t];
          const float* value = value_row + (head / group) * dim;
          float* oh = orow + head * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) oh[d] += p * value[d];
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
            name=f"seesaw_paged_decode_{capability.lower()}",
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
