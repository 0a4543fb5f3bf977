"""The dropout masks of the kernels: Bernoulli keep decisions from Philox-4x32-10, four per call.

A Philox call returns four 32-bit outputs for one 128-bit counter. Using one of them per element (as tl.rand does)
throws three quarters of the work away, and the work is large: in the sm_90 SASS of the attention forward (bf16,
D=128, 64x64 tiles) dropout raised the instruction count from 1152 to 3064, ~60 integer instructions per element, more
than the tile's loads, matmuls and softmax together. Here one call serves 4 consecutive columns.
"""
import triton
import triton.language as tl


@triton.jit
def philox_keep(seed, c0, c1, dropout_p, ROWS: tl.constexpr, COLS: tl.constexpr):
    """(ROWS, COLS) keep decisions, each True with probability 1 - dropout_p: column 4g + k of row r keeps iff output k
    of the Philox call with key `seed` and counter (c0[r, g], c1[r, g], 0, 0), as a uniform float in [0, 1), is
    >= dropout_p. c0, c1: (ROWS, COLS // 4) uint32; each counter must be used by one call only."""
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    k0, k1 = tl.uint_to_uniform_float(r0) >= dropout_p, tl.uint_to_uniform_float(r1) >= dropout_p
    k2, k3 = tl.uint_to_uniform_float(r2) >= dropout_p, tl.uint_to_uniform_float(r3) >= dropout_p
    # join(join(k0, k2), join(k1, k3))[r, g, a, b] = k_(2a + b): flattened row-major, columns 4g .. 4g + 3 hold k0..k3.
    return tl.reshape(tl.join(tl.join(k0, k2), tl.join(k1, k3)), [ROWS, COLS])
