/* vilbert_kernels: ViLBERT's fused attention kernels (Triton, compiled ahead of time) for C and C++ programs.
 *
 * Forward passes for inference: no dropout, no backward. Every function enqueues one kernel on `stream` in the CUDA
 * context current on the calling thread (the CUDA runtime's primary context works: call cudaSetDevice first) and
 * returns without waiting; it is safe to call from several threads. Kernels are chosen by the device's compute
 * capability, the dtype and the head dim; a combination that was not compiled returns VK_ERROR_UNSUPPORTED. Each
 * kernel is loaded into a context on first use and kept there: do not reset a context and use the library again.
 *
 * Layout, as the Python API: (batch, seqlen, nheads, headdim). Inputs take strides for the first three dims (in
 * elements) with the head dim contiguous, each row 16-byte aligned: a stride of a dim longer than 1 must be a multiple
 * of 16 bytes (contiguous tensors and slices of a fused QKV projection are; the Python API copies other layouts, here
 * they are VK_ERROR_MISALIGNED). Outputs are contiguous. Device pointers must be 16-byte aligned.
 *
 * The CUDA driver is loaded at run time (dlopen of libcuda.so.1): linking needs no driver library.
 */
#ifndef VILBERT_KERNELS_H
#define VILBERT_KERNELS_H

#include <stdint.h>

#include <cuda.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The shared library exports these functions only (it is built with hidden visibility). */
#if defined(__GNUC__)
#define VK_API __attribute__((visibility("default")))
#else
#define VK_API
#endif

typedef enum vk_status {
  VK_SUCCESS = 0,
  VK_ERROR_INVALID_VALUE = 1, /* a size, stride or pointer out of range (details in the function's comment) */
  VK_ERROR_MISALIGNED = 2,    /* a device pointer or an input's stride is not 16-byte aligned */
  VK_ERROR_UNSUPPORTED = 3,   /* no kernel compiled for this architecture, dtype and head dim */
  VK_ERROR_NO_DRIVER = 4,     /* libcuda.so.1 could not be loaded */
  VK_ERROR_NO_CONTEXT = 5,    /* no CUDA context is current on the calling thread */
  VK_ERROR_CUDA = 6           /* a CUDA driver call failed: vk_last_cuda_result() says which error */
} vk_status;

typedef enum vk_dtype {
  VK_FLOAT32 = 0,
  VK_FLOAT16 = 1,
  VK_BFLOAT16 = 2
} vk_dtype;

/* One (batch, seqlen, nheads, headdim) tensor on the device: its data and the strides of its first three dims, in
 * elements (the head dim is contiguous). */
typedef struct vk_tensor {
  CUdeviceptr data;
  int64_t stride_batch;
  int64_t stride_seq;
  int64_t stride_head;
} vk_tensor;

/* A readable message for `status` (static storage; never NULL). */
VK_API const char *vk_status_string(vk_status status);

/* The CUresult of the last driver call that failed on this thread (VK_ERROR_CUDA). */
VK_API CUresult vk_last_cuda_result(void);

/* What was wrong in the last call on this thread that returned an error, naming the argument at fault, e.g.
 * "k: (seqlen + 128) * stride_seq + headdim reaches 2^31 ..." (static storage; "" before any error). */
VK_API const char *vk_last_error_message(void);

/* Attention forward, as the Python `vilbert_kernels.attention` with dropout_p = 0:
 *   out[b, i, h] = sum_j softmax_j(softmax_scale * q[b, i, h] . k[b, j, h]) v[b, j, h]   over keys j < kv_lens[b],
 *   rows i >= q_lens[b] of out are zero, a sample with kv_lens[b] == 0 gives zeros.
 *
 * dtype:        VK_FLOAT16 or VK_BFLOAT16 (the compiled kernels; VK_FLOAT32 returns VK_ERROR_UNSUPPORTED).
 * batch, seqlen_q, seqlen_k, nheads, headdim: sizes; seqlen_q, seqlen_k >= 1; headdim 64 or 128.
 * q:            (batch, seqlen_q, nheads, headdim), strided.
 * k, v:         (batch, seqlen_k, nheads, headdim), strided.
 * out:          (batch, seqlen_q, nheads, headdim) of dtype, contiguous; written.
 * lse:          (batch, nheads, seqlen_q) float32, contiguous; written: the log-sum-exp of each row's scaled scores
 *               (+inf for rows without keys); what a caller needs to merge attention over several key sets.
 * q_lens, kv_lens: (batch,) int64 on the device, required (fill with seqlen_q / seqlen_k for unpadded samples);
 *               clamped to [0, seqlen] in the kernel.
 * softmax_scale: finite and > 0, usually 1 / sqrt(headdim).
 * Errors: VK_ERROR_INVALID_VALUE for a size out of range, a NULL pointer, a stride or length beyond int32, rows of
 * one (sample, head) beyond 32-bit offsets ((seqlen + 128) * stride_seq + headdim >= 2^31, outputs included), a bad
 * scale; VK_ERROR_MISALIGNED; VK_ERROR_UNSUPPORTED for a dtype, head dim or GPU without a compiled kernel. */
VK_API vk_status vk_attention_forward(vk_dtype dtype, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                      int64_t nheads, int64_t headdim, vk_tensor q, vk_tensor k, vk_tensor v,
                                      CUdeviceptr out, CUdeviceptr lse, CUdeviceptr q_lens, CUdeviceptr kv_lens,
                                      float softmax_scale, CUstream stream);

/* ViLBERT's co-attention forward, both directions in one launch, as the Python `vilbert_kernels.co_attention`:
 *   text_out  = attention(text_q,  image_k, image_v, q_lens = text_lens,  kv_lens = image_lens)
 *   image_out = attention(image_q, text_k,  text_v,  q_lens = image_lens, kv_lens = text_lens)
 *
 * text_q, text_k, text_v:    (batch, seqlen_text, nheads, headdim), strided.
 * image_q, image_k, image_v: (batch, seqlen_image, nheads, headdim), strided.
 * text_out, image_out:       contiguous like text_q / image_q; written.
 * text_lse, image_lse:       (batch, nheads, seqlen_text) / (batch, nheads, seqlen_image) float32; written.
 * text_lens, image_lens:     (batch,) int64 on the device, required.
 * Other arguments and errors as vk_attention_forward. */
VK_API vk_status vk_co_attention_forward(vk_dtype dtype, int64_t batch, int64_t seqlen_text,
                                         int64_t seqlen_image, int64_t nheads, int64_t headdim, vk_tensor text_q,
                                         vk_tensor text_k, vk_tensor text_v, vk_tensor image_q, vk_tensor image_k,
                                         vk_tensor image_v, CUdeviceptr text_out, CUdeviceptr image_out,
                                         CUdeviceptr text_lse, CUdeviceptr image_lse, CUdeviceptr text_lens,
                                         CUdeviceptr image_lens, float softmax_scale, CUstream stream);

#ifdef __cplusplus
}
#endif

#endif /* VILBERT_KERNELS_H */
