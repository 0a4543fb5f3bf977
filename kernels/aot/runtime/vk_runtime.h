/* Internal runtime of the vilbert_kernels C library: loads the CUDA driver, caches modules per context, launches.
 *
 * The generated launchers (vk_kernels.c) describe each compiled kernel as a vk_kernel_image and call vk_launch();
 * nothing here is part of the public API (include/vilbert_kernels.h).
 */
#ifndef VK_RUNTIME_H
#define VK_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#include "vilbert_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One kernel compiled ahead of time for one architecture. */
typedef struct vk_kernel_image {
  const char *name;            /* entry point in the cubin (the @triton.jit function's name) */
  const unsigned char *cubin;  /* the cubin's bytes, embedded in the library */
  size_t cubin_size;
  int arch;                    /* compute capability it was built for, major * 10 + minor (90 = sm_90a) */
  unsigned num_warps;          /* block = num_warps * 32 threads */
  unsigned shared_bytes;       /* dynamic shared memory per block */
} vk_kernel_image;

/* Records `message` (static storage) as what vk_last_error_message() says on this thread, and returns `status`: how
 * a failing check names the argument at fault. */
vk_status vk_fail(vk_status status, const char *message);

static inline int vk_fits_int32(int64_t value) { return value >= INT32_MIN && value <= INT32_MAX; }

/* Whether every (batch, seq, head) row of `t` starts 16 bytes after a 16-byte aligned one, as the kernels read them
 * (16-byte vector loads): the stride of each dim longer than 1, in bytes, a multiple of 16. */
static inline int vk_rows_aligned(vk_tensor t, int64_t batch, int64_t seqlen, int64_t nheads, int64_t elem_bytes) {
  return (batch < 2 || (t.stride_batch * elem_bytes) % 16 == 0) &&
         (seqlen < 2 || (t.stride_seq * elem_bytes) % 16 == 0) &&
         (nheads < 2 || (t.stride_head * elem_bytes) % 16 == 0);
}

/* Whether the 32-bit offsets the kernels compute for the rows of one (sample, head) reach every row of a tensor with
 * row stride `stride_seq`, past its `seqlen` rows by up to a tile of 128 (masked, but addressed): as the Python
 * launcher's check, which copies such a tensor where this one refuses it. */
static inline int vk_rows_addressable(int64_t stride_seq, int64_t seqlen, int64_t headdim) {
  if (stride_seq < -INT32_MAX || stride_seq > INT32_MAX || seqlen > INT32_MAX || headdim > INT32_MAX) return 0;
  if (stride_seq < 0) stride_seq = -stride_seq;
  return (seqlen + 128) * stride_seq + headdim <= INT32_MAX;
}

/* Compute capability (major * 10 + minor) of the device of the calling thread's current context. */
vk_status vk_current_arch(int *arch);

/* Whether a cubin built for `image_arch` runs on a device of compute capability `device_arch`. */
int vk_arch_runs(int image_arch, int device_arch);

/* Launch `image` on `stream` with `params` in the kernel's parameter order (triton's two trailing scratch pointers
 * included). The module is loaded into the current context on first use and cached. An empty grid launches nothing;
 * a grid beyond CUDA's limits is VK_ERROR_INVALID_VALUE. */
vk_status vk_launch(const vk_kernel_image *image, const unsigned grid[3], void **params, CUstream stream);

#ifdef __cplusplus
}
#endif

#endif /* VK_RUNTIME_H */
