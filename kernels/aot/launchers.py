"""The C API functions of include/vilbert_kernels.h and how each launches its kernel: the C twin of the Python launcher
`vilbert_kernels.attention._attention_forward` (same arguments, grid and tile choice), for inference (no dropout).
"""
from typing import Dict, List

from ..attention import _attention_fwd_kernel, sm90_specs
from ..kernel_spec import KernelSpec
from .generate import CLauncher

_VK_DTYPES = {"*fp16": "VK_FLOAT16", "*bf16": "VK_BFLOAT16", "*fp32": "VK_FLOAT32"}


def forward_specs() -> List[KernelSpec]:
    """The inference variants of the forward kernel among those compile_check checks (half precision, no dropout),
    smallest tiles first, so the launcher takes the smallest that covers the sequences."""
    specs = [s for s in sm90_specs(dtypes=("fp16", "bf16")) if s.fn is _attention_fwd_kernel
             and not s.constexprs["DROPOUT"]]
    return sorted(specs, key=lambda s: (s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"]))


def forward_dispatch(spec: KernelSpec) -> List[str]:
    return [f"dtype == {_VK_DTYPES[spec.signature['Q0']]}", f"headdim == {spec.constexprs['HEAD_DIM']}",
            f"block_m <= {spec.constexprs['BLOCK_M']}", f"block_n <= {spec.constexprs['BLOCK_N']}"]


def _strides(kernel_name: str, tensor: str) -> Dict[str, str]:
    """stride_<kernel_name>{b,l,h} -> the vk_tensor's strides."""
    return {f"stride_{kernel_name}b": f"{tensor}.stride_batch", f"stride_{kernel_name}l": f"{tensor}.stride_seq",
            f"stride_{kernel_name}h": f"{tensor}.stride_head"}


def _block(length: str) -> str:
    """C expression of `attention._block`: the tile size the Python launcher picks for a sequence of `length`."""
    return f"({length} <= 16 ? 16 : {length} <= 32 ? 32 : 64)"


def _fail_if(condition: str, status: str, message: str) -> str:
    """C statement: return `status` with `message` (vk_last_error_message) when `condition` holds."""
    return f"  if ({condition})\n    return vk_fail({status}, \"{message}\");\n"


def _invalid_if(condition: str, message: str) -> str:
    return _fail_if(condition, "VK_ERROR_INVALID_VALUE", message)


# Checks shared by both functions: positive sizes, a grid that fits, and the inputs every variant reads.
_COMMON_CHECKS = (
    _invalid_if("batch < 0 || batch > INT32_MAX", "batch must be in [0, 2^31 - 1]")
    + _invalid_if("nheads < 1 || nheads > INT32_MAX || batch * nheads > INT32_MAX",
                  "nheads must be >= 1, and batch * nheads at most 2^31 - 1")
    + _invalid_if("headdim < 1 || headdim > INT32_MAX", "headdim must be >= 1")
    + _invalid_if("!(softmax_scale > 0.0f && softmax_scale <= FLT_MAX)", "softmax_scale must be finite and > 0")
    + "  const int64_t elem_bytes = dtype == VK_FLOAT32 ? 4 : 2;\n")


def _non_null(pointers) -> str:
    return "".join(_invalid_if(f"!{p}", f"{p} is NULL") for p in pointers)


def _rows_aligned(tensors_and_lengths) -> str:
    """C checks that every input's rows start 16-byte aligned (the Python launcher copies a tensor whose rows do not;
    here it is the caller's to do)."""
    return "".join(_fail_if(f"!vk_rows_aligned({t}, batch, {length}, nheads, elem_bytes)", "VK_ERROR_MISALIGNED",
                            f"{t}: a stride of a dim longer than 1 is not a multiple of 16 bytes")
                   for t, length in tensors_and_lengths)


def _rows_addressable(inputs_and_lengths, outputs_and_lengths) -> str:
    """C checks that the kernels' 32-bit row offsets within one (sample, head) reach every row of each input and of
    each (contiguous) output (the Python launcher copies an input with too large a row stride; here it is refused)."""
    beyond = "reaches 2^31: beyond the kernels' 32-bit row offsets"
    return "".join(
        [_invalid_if(f"!vk_rows_addressable({t}.stride_seq, {length}, headdim)",
                     f"{t}: ({length} + 128) * stride_seq + headdim {beyond}") for t, length in inputs_and_lengths]
        + [_invalid_if(f"!vk_rows_addressable(nheads * headdim, {length}, headdim)",
                       f"{out}: ({length} + 128) * nheads * headdim + headdim {beyond}")
           for out, length in outputs_and_lengths])


ATTENTION_FORWARD = CLauncher(
    name="vk_attention_forward",
    params="vk_dtype dtype, int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads, int64_t headdim, "
           "vk_tensor q, vk_tensor k, vk_tensor v, CUdeviceptr out, CUdeviceptr lse, CUdeviceptr q_lens, "
           "CUdeviceptr kv_lens, float softmax_scale, CUstream stream",
    specs=forward_specs,
    dispatch=forward_dispatch,
    # One direction: the kernel's second direction gets the same tensors and is never launched (grid z = 1).
    args={"Q0": "q.data", "K0": "k.data", "V0": "v.data", "O0": "out", "LSE0": "lse",
          "Q1": "q.data", "K1": "k.data", "V1": "v.data", "O1": "out", "LSE1": "lse",
          "LENS_A": "q_lens", "LENS_B": "kv_lens",
          **_strides("q0", "q"), **_strides("k0", "k"), **_strides("v0", "v"),
          **_strides("q1", "q"), **_strides("k1", "k"), **_strides("v1", "v"),
          "L_A": "seqlen_q", "L_B": "seqlen_k", "H": "nheads",
          "softmax_scale": "softmax_scale", "dropout_p": "0.0f", "SEED": "0"},
    grid=("batch * nheads", "(seqlen_q + {BLOCK_M} - 1) / {BLOCK_M}", "1"),
    checks=_COMMON_CHECKS + _invalid_if("seqlen_q < 1 || seqlen_k < 1", "seqlen_q and seqlen_k must be >= 1")
           + _non_null(["q.data", "k.data", "v.data", "out", "lse", "q_lens", "kv_lens"])
           + _rows_aligned([("q", "seqlen_q"), ("k", "seqlen_k"), ("v", "seqlen_k")])
           + _rows_addressable([("q", "seqlen_q"), ("k", "seqlen_k"), ("v", "seqlen_k")], [("out", "seqlen_q")])
           + f"""\
  const int64_t block_m = {_block("seqlen_q")}, block_n = {_block("seqlen_k")};
""",
)

CO_ATTENTION_FORWARD = CLauncher(
    name="vk_co_attention_forward",
    params="vk_dtype dtype, int64_t batch, int64_t seqlen_text, int64_t seqlen_image, int64_t nheads, "
           "int64_t headdim, vk_tensor text_q, vk_tensor text_k, vk_tensor text_v, vk_tensor image_q, "
           "vk_tensor image_k, vk_tensor image_v, CUdeviceptr text_out, CUdeviceptr image_out, CUdeviceptr text_lse, "
           "CUdeviceptr image_lse, CUdeviceptr text_lens, CUdeviceptr image_lens, float softmax_scale, "
           "CUstream stream",
    specs=forward_specs,
    dispatch=forward_dispatch,
    # Direction 0: text queries over image keys; direction 1: image queries over text keys (grid z).
    args={"Q0": "text_q.data", "K0": "image_k.data", "V0": "image_v.data", "O0": "text_out", "LSE0": "text_lse",
          "Q1": "image_q.data", "K1": "text_k.data", "V1": "text_v.data", "O1": "image_out", "LSE1": "image_lse",
          "LENS_A": "text_lens", "LENS_B": "image_lens",
          **_strides("q0", "text_q"), **_strides("k0", "image_k"), **_strides("v0", "image_v"),
          **_strides("q1", "image_q"), **_strides("k1", "text_k"), **_strides("v1", "text_v"),
          "L_A": "seqlen_text", "L_B": "seqlen_image", "H": "nheads",
          "softmax_scale": "softmax_scale", "dropout_p": "0.0f", "SEED": "0"},
    grid=("batch * nheads", "(max_len + {BLOCK_M} - 1) / {BLOCK_M}", "2"),
    checks=_COMMON_CHECKS
           + _invalid_if("seqlen_text < 1 || seqlen_image < 1", "seqlen_text and seqlen_image must be >= 1")
           + _non_null([f"{stream}_{t}.data" for stream in ("text", "image") for t in "qkv"]
                       + [f"{stream}_{what}" for what in ("out", "lse", "lens") for stream in ("text", "image")])
           + _rows_aligned([(f"{stream}_{t}", f"seqlen_{stream}") for stream in ("text", "image") for t in "qkv"])
           + _rows_addressable([(f"{stream}_{t}", f"seqlen_{stream}") for stream in ("text", "image") for t in "qkv"],
                               [("text_out", "seqlen_text"), ("image_out", "seqlen_image")])
           + f"""\
  /* Both directions share one grid and one tile size: that of the longer sequence. */
  const int64_t max_len = seqlen_text > seqlen_image ? seqlen_text : seqlen_image;
  const int64_t block_m = {_block("max_len")}, block_n = block_m;
""",
)

LAUNCHERS = [ATTENTION_FORWARD, CO_ATTENTION_FORWARD]
