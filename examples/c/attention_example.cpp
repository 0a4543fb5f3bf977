// ViLBERT co-attention and attention from C++ through libvilbert_kernels, without Python.
//
//   attention_example [OUT_DIR]
//
// Builds bf16 inputs the way a ViLBERT layer holds them (q, k and v as slices of one fused (batch, seqlen, 3, nheads,
// headdim) projection, read in place through strides), runs vk_co_attention_forward (text <-> image) and
// vk_attention_forward (image self-attention), and prints a checksum of each output. With OUT_DIR it also writes the
// inputs and outputs there as raw little-endian arrays (tests/test_aot.py compares them with the Python kernels):
//   text_qkv.bf16 (B, T, 3, H, D), image_qkv.bf16 (B, V, 3, H, D), text_lens.i64, image_lens.i64 (B,),
//   text_out.bf16 (B, T, H, D), image_out.bf16 (B, V, H, D), image_self_out.bf16 (B, V, H, D).
#include <cuda_runtime.h>
#include <vilbert_kernels.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t kBatch = 3, kTextLen = 37, kImageLen = 51, kHeads = 8, kHeadDim = 128;

#define CHECK_CUDA(call)                                                                          \
  do {                                                                                            \
    cudaError_t err_ = (call);                                                                    \
    if (err_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(err_));                   \
      std::exit(2);                                                                               \
    }                                                                                             \
  } while (0)

#define CHECK_VK(call)                                                                            \
  do {                                                                                            \
    vk_status status_ = (call);                                                                   \
    if (status_ != VK_SUCCESS) {                                                                  \
      std::fprintf(stderr, "%s failed: %s: %s\n", #call, vk_status_string(status_),               \
                   vk_last_error_message());                                                      \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

// bf16 is the top half of a float32; the inputs are multiples of 1/16 in [-1, 1], exact in bf16.
uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);
}

float from_bf16(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// Deterministic inputs: a simple integer hash of the element index and a salt per tensor.
std::vector<uint16_t> make_input(size_t n, uint32_t salt) {
  std::vector<uint16_t> data(n);
  for (size_t i = 0; i < n; ++i) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ salt * 40503u;
    h ^= h >> 15;
    data[i] = to_bf16(static_cast<float>(static_cast<int>(h % 33) - 16) / 16.0f);
  }
  return data;
}

template <typename T>
CUdeviceptr to_device(const std::vector<T>& host) {
  void* ptr = nullptr;
  CHECK_CUDA(cudaMalloc(&ptr, host.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return reinterpret_cast<CUdeviceptr>(ptr);
}

// An output buffer, filled with NaNs (0xff bytes) so that anything the kernels leave unwritten shows.
CUdeviceptr device_buffer(size_t bytes) {
  void* ptr = nullptr;
  CHECK_CUDA(cudaMalloc(&ptr, bytes));
  CHECK_CUDA(cudaMemset(ptr, 0xff, bytes));
  return reinterpret_cast<CUdeviceptr>(ptr);
}

// q, k, v of one stream: slices 0, 1, 2 of a fused (batch, seqlen, 3, nheads, headdim) bf16 projection.
struct Qkv {
  vk_tensor q, k, v;
};

Qkv fused_qkv(CUdeviceptr base, int64_t seqlen) {
  const int64_t stride_head = kHeadDim, stride_seq = 3 * kHeads * kHeadDim, stride_batch = seqlen * stride_seq;
  auto slice = [&](int64_t which) {
    return vk_tensor{base + static_cast<CUdeviceptr>(which * kHeads * kHeadDim * 2), stride_batch, stride_seq,
                     stride_head};
  };
  return {slice(0), slice(1), slice(2)};
}

std::vector<uint16_t> download(CUdeviceptr ptr, size_t n) {
  std::vector<uint16_t> host(n);
  CHECK_CUDA(cudaMemcpy(host.data(), reinterpret_cast<void*>(ptr), n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  return host;
}

double checksum(const std::vector<uint16_t>& data) {
  double sum = 0.0;
  for (uint16_t h : data) sum += std::fabs(from_bf16(h));
  return sum;
}

template <typename T>
void write_file(const std::string& dir, const char* name, const std::vector<T>& data) {
  const std::string path = dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(data.data(), sizeof(T), data.size(), f) != data.size()) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  CHECK_CUDA(cudaSetDevice(0));  // makes the device's primary context current, as the library expects
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));

  const auto text_qkv = make_input(kBatch * kTextLen * 3 * kHeads * kHeadDim, 1);
  const auto image_qkv = make_input(kBatch * kImageLen * 3 * kHeads * kHeadDim, 2);
  // Padding as in a ViLBERT batch; the last sample has no text at all (its image side attends to nothing).
  const std::vector<int64_t> text_lens = {kTextLen, 19, 0}, image_lens = {kImageLen, 37, 9};
  const Qkv text = fused_qkv(to_device(text_qkv), kTextLen);
  const Qkv image = fused_qkv(to_device(image_qkv), kImageLen);
  const CUdeviceptr d_text_lens = to_device(text_lens), d_image_lens = to_device(image_lens);

  const size_t text_out_n = kBatch * kTextLen * kHeads * kHeadDim, image_out_n = kBatch * kImageLen * kHeads * kHeadDim;
  const CUdeviceptr text_out = device_buffer(text_out_n * 2), image_out = device_buffer(image_out_n * 2);
  const CUdeviceptr image_self_out = device_buffer(image_out_n * 2);
  const CUdeviceptr text_lse = device_buffer(kBatch * kHeads * kTextLen * 4);
  const CUdeviceptr image_lse = device_buffer(kBatch * kHeads * kImageLen * 4);
  const CUdeviceptr image_self_lse = device_buffer(kBatch * kHeads * kImageLen * 4);
  const float softmax_scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  auto cu_stream = reinterpret_cast<CUstream>(stream);  // the runtime's and the driver's stream are one type

  CHECK_VK(vk_co_attention_forward(VK_BFLOAT16, kBatch, kTextLen, kImageLen, kHeads, kHeadDim, text.q, text.k,
                                   text.v, image.q, image.k, image.v, text_out, image_out, text_lse, image_lse,
                                   d_text_lens, d_image_lens, softmax_scale, cu_stream));
  CHECK_VK(vk_attention_forward(VK_BFLOAT16, kBatch, kImageLen, kImageLen, kHeads, kHeadDim, image.q, image.k,
                                image.v, image_self_out, image_self_lse, d_image_lens, d_image_lens, softmax_scale,
                                cu_stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));

  const auto h_text_out = download(text_out, text_out_n), h_image_out = download(image_out, image_out_n);
  const auto h_image_self_out = download(image_self_out, image_out_n);
  std::printf("co_attention text_out  checksum %.6f\n", checksum(h_text_out));
  std::printf("co_attention image_out checksum %.6f\n", checksum(h_image_out));
  std::printf("attention image_self_out checksum %.6f\n", checksum(h_image_self_out));
  if (argc > 1) {
    const std::string dir = argv[1];
    write_file(dir, "text_qkv.bf16", text_qkv);
    write_file(dir, "image_qkv.bf16", image_qkv);
    write_file(dir, "text_lens.i64", text_lens);
    write_file(dir, "image_lens.i64", image_lens);
    write_file(dir, "text_out.bf16", h_text_out);
    write_file(dir, "image_out.bf16", h_image_out);
    write_file(dir, "image_self_out.bf16", h_image_self_out);
  }
  return 0;  // the device buffers go with the process
}
