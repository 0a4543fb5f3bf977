"""Suite `kernels`: attention and co_attention, forward / backward / forward+backward, every provider against the plain
PyTorch reference, at ViLBERT's shapes and at long square shapes.

Shapes (bf16 on a GPU):
  co_attention  pretraining B=256 T=36 V=37 and downstream B=128 T=80 V=101, 8 heads x 128, ragged lengths;
  attention     text self-attention, pretraining B=256 L=36 and downstream B=128 L=80, 12 heads x 64, ragged;
  attention     square L = 512, 1024, 2048, 16 heads x 64, B = 16384 / L, full lengths, no dropout.
Ragged lengths are drawn like real data: text lengths from a normal around 60% of the padded length (sd 20%), clipped
to [2, T]; region counts uniform in 10..V-1 (as a detector's output) plus the IMG token. Dropout 0 and 0.1.

Counting (the same for every provider, so TFLOP/s and GB/s ratios are speed ratios):
  FLOP  forward 4*B*H*Lq*Lk*D per direction over the PADDED lengths; backward 2.5x forward.
  bytes the minimum: forward reads q, k, v and writes o plus an
        fp32 log-sum-exp; backward reads q, k, v, o, dO and the LSE and writes dq, dk, dv; tensors as stored (padded).

Correctness before timing: each provider runs at dropout 0 on the benchmark's inputs, in the benchmark's dtype; its
output (valid query rows) and its gradients (dO is zero at padded query rows, so every provider's dq/dk/dv there is
defined and zero) are compared with the reference computed in fp32 on the same inputs. The allowed relative error is
2x (3x for gradients) the error of the reference itself run in the benchmark dtype, plus a floor. Rows with dropout
0.1 carry that dropout-0 verdict, and the dropout run must also give a finite output that differs from the no-dropout
one. A provider that fails is reported `correct: false` and not timed.

co_attention's baselines run the two directions as two calls (text queries over image keys, then image over text);
ours runs `vilbert_kernels.co_attention`, one call.
"""
import contextlib
import importlib
import json
import math
import re
import traceback
import warnings
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import common
from .common import OURS, Skip

# ----------------------------------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    op: str  # "attention" | "co_attention"
    family: str  # "pretraining" | "downstream" | "square" (tiny variants on the CPU)
    B: int
    H: int
    D: int
    Lq: int  # attention: query length; co_attention: text length T
    Lk: int  # attention: key length; co_attention: image length V
    ragged: bool
    dropout_p: float

    def shape(self) -> dict:
        lengths = {"T": self.Lq, "V": self.Lk} if self.op == "co_attention" else {"Lq": self.Lq, "Lk": self.Lk}
        return {"family": self.family, "B": self.B, **lengths, "H": self.H, "D": self.D, "ragged": self.ragged}

    def without_dropout(self) -> "Case":
        return Case(self.op, self.family, self.B, self.H, self.D, self.Lq, self.Lk, self.ragged, 0.0)


def cases(on_gpu: bool, quick: bool) -> List[Case]:
    """In priority order (the cases bench.targets reads first), so a time budget cuts the least important ones."""
    if on_gpu:
        vilbert = [("co_attention", "pretraining", 256, 8, 128, 36, 37),
                   ("co_attention", "downstream", 128, 8, 128, 80, 101),
                   ("attention", "pretraining", 256, 12, 64, 36, 36),
                   ("attention", "downstream", 128, 12, 64, 80, 80)]
        square = [(1024, 16, 64), (2048, 16, 64)] + ([] if quick else [(512, 16, 64)])
        tokens = 16384
    else:  # tiny shapes that prove the harness; CPU times say nothing about GPU speed
        vilbert = [("co_attention", "pretraining-tiny", 3, 2, 16, 9, 10),
                   ("attention", "pretraining-tiny", 3, 2, 16, 9, 9)]
        square = [(16, 2, 16), (32, 2, 16)] + ([] if quick else [(64, 2, 16)])
        tokens = 64
    # The targets' cases first: co_attention at p=0.1 and the square shapes; then the rest of the ViLBERT shapes.
    vilbert_cases = [Case(op, fam, B, H, D, lq, lk, True, p) for p in (0.1, 0.0)
                     for op, fam, B, H, D, lq, lk in vilbert]
    targeted = [c for c in vilbert_cases if c.op == "co_attention" and c.dropout_p > 0]
    square_cases = [Case("attention", "square", tokens // L, H, D, L, L, False, 0.0) for L, H, D in square]
    return targeted + square_cases + [c for c in vilbert_cases if c not in targeted]


@dataclass
class Inputs:
    """One case's tensors, padded (B, L, H, D) in the benchmark dtype, with each tensor's stream and its lengths."""
    tensors: Dict[str, torch.Tensor]
    streams: Dict[str, str]  # tensor name -> stream ("q"/"kv" for attention, "text"/"image" for co_attention)
    lens: Dict[str, Optional[torch.Tensor]]  # stream -> (B,) int64, None = every position real
    lengths: Dict[str, int]  # stream -> padded length
    out_streams: Tuple[str, ...]  # stream of each output
    douts: List[torch.Tensor]  # cotangents of the outputs, zero at padded query rows

    def valid(self, stream: str) -> Optional[torch.Tensor]:
        """(B, L) bool, True at real positions (None when the stream is not ragged)."""
        lens = self.lens[stream]
        if lens is None:
            return None
        return torch.arange(self.lengths[stream], device=lens.device)[None, :] < lens[:, None]


def draw_lengths(case: Case, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """(text_lens, image_lens), int64 (B,): text ~ clipped normal around 60%; regions uniform 10..V-1 plus IMG."""
    T, V = case.Lq, case.Lk
    text = torch.normal(0.6 * T, 0.2 * T, (case.B,), generator=gen).round().clamp(2, T).long()
    low = min(10, V - 1)
    image = torch.randint(low, V, (case.B,), generator=gen) + 1  # regions in [low, V-1], then the IMG token
    return text, image


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    text_lens, image_lens = draw_lengths(case, gen) if case.ragged else (None, None)
    if case.op == "co_attention":
        lens = {"text": text_lens, "image": image_lens}
        lengths = {"text": case.Lq, "image": case.Lk}
        streams = {f"{s}_{t}": s for s in ("text", "image") for t in "qkv"}
        out_streams = ("text", "image")
    else:  # text self-attention (or square): queries and keys share the lengths
        lens = {"q": text_lens, "kv": text_lens}
        lengths = {"q": case.Lq, "kv": case.Lk}
        streams = {"q": "q", "k": "kv", "v": "kv"}
        out_streams = ("q",)
    lens = {s: None if l is None else l.to(device) for s, l in lens.items()}

    def randn(stream):  # (B, L, H, D); N(0, 1) on the CPU generator, so every device sees the same numbers
        return torch.randn(case.B, lengths[stream], case.H, case.D, generator=gen).to(device, dtype)

    tensors = {name: randn(stream) for name, stream in streams.items()}
    inputs = Inputs(tensors, streams, lens, lengths, out_streams, [])
    for stream in out_streams:
        dout = randn(stream)
        valid = inputs.valid(stream)
        inputs.douts.append(dout if valid is None else dout * valid[:, :, None, None])
    return inputs


def directions(op: str):
    """(q, k, v, q stream, kv stream) of each attention call a two-call baseline makes."""
    if op == "co_attention":
        return [("text_q", "image_k", "image_v", "text", "image"), ("image_q", "text_k", "text_v", "image", "text")]
    return [("q", "k", "v", "q", "kv")]


# ----------------------------------------------------------------------------------------------------------------------
# Providers: one small class each; `attention` runs one direction in the provider's own layout


class Provider:
    name = ""
    needs_gpu = False  # reported skipped on the CPU
    compiled = False  # built with torch.compile (skipped on the CPU unless --cpu-compile: minutes of compilation)
    supports_dropout = True
    packed = False  # takes (total_tokens, H, D) tensors of the real tokens instead of padded (B, L, H, D)

    def unavailable(self, case: Case) -> Optional[str]:
        """Why this provider cannot run the case here (an import missing, a feature missing), or None."""
        return None

    def running(self):
        """Context of every forward and backward call the runner makes (OursTiles sets its launch tiles here)."""
        return contextlib.nullcontext()

    def stream_meta(self, lens: Optional[torch.Tensor], length: int, batch: int, device):
        """Per-stream data the provider needs (masks, cu_seqlens), built once, outside the timed region."""
        return lens

    def attention(self, q, k, v, q_meta, kv_meta, dropout_p):
        raise NotImplementedError

    def co_attention(self, t: Dict[str, torch.Tensor], metas: Dict[str, object], dropout_p):
        return tuple(self.attention(t[q], t[k], t[v], metas[qs], metas[ks], dropout_p)
                     for q, k, v, qs, ks in directions("co_attention"))


class Reference(Provider):
    name = "reference"

    def attention(self, q, k, v, q_lens, kv_lens, dropout_p):
        from vilbert_kernels import reference
        return reference.attention(q, k, v, q_lens, kv_lens, dropout_p)

    def co_attention(self, t, metas, dropout_p):
        from vilbert_kernels import reference
        return reference.co_attention(*(t[f"{s}_{x}"] for s in ("text", "image") for x in "qkv"),
                                      metas["text"], metas["image"], dropout_p)


class ReferenceCompiled(Reference):
    """torch.compile of the reference (default mode, static shapes): what inductor makes of the plain PyTorch."""
    name = "reference_compiled"
    compiled = True

    def __init__(self):
        self._attention = self._co_attention = None

    def attention(self, q, k, v, q_lens, kv_lens, dropout_p):
        from vilbert_kernels import reference
        if self._attention is None:
            self._attention = torch.compile(reference.attention, dynamic=False)
        return self._attention(q, k, v, q_lens, kv_lens, dropout_p)

    def co_attention(self, t, metas, dropout_p):
        from vilbert_kernels import reference
        if self._co_attention is None:
            self._co_attention = torch.compile(reference.co_attention, dynamic=False)
        return self._co_attention(*(t[f"{s}_{x}"] for s in ("text", "image") for x in "qkv"),
                                  metas["text"], metas["image"], dropout_p)


class SDPA(Provider):
    """F.scaled_dot_product_attention with a boolean key-padding mask; `backend` forces one of its kernels."""

    def __init__(self, backend: Optional[str] = None):
        self.backend = backend
        self.name = "sdpa" if backend is None else f"sdpa_{backend.lower().replace('_attention', '')}"

    def stream_meta(self, lens, length, batch, device):
        if lens is None:
            return None
        return (torch.arange(length, device=device)[None, :] < lens[:, None])[:, None, None, :]  # (B, 1, 1, Lk)

    def attention(self, q, k, v, q_mask, kv_mask, dropout_p):
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D) views, no copies
        if self.backend is None:
            return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=kv_mask, dropout_p=dropout_p).transpose(1, 2)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        call = lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=kv_mask, dropout_p=dropout_p)  # noqa
        try:
            with sdpa_kernel(getattr(SDPBackend, self.backend)):
                return call().transpose(1, 2)  # (B, L, H, D)
        except RuntimeError as e:
            if not any(text in str(e).lower() for text in ("no available kernel", "no viable backend")):
                raise
        # The forced backend refuses this case; SDPA says why in warnings, so ask once more and keep them.
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel(getattr(SDPBackend, self.backend)):
            warnings.simplefilter("always")
            try:
                call()
            except RuntimeError:
                pass
        why = "; ".join(re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message)).strip()
                        for w in caught)
        raise Skip(f"SDPA {self.backend} has no kernel for this case" + (f": {why}" if why else ""))


class Flex(Provider):
    """FlexAttention, compiled, with a key-padding block mask (it has no dropout)."""
    name = "flex"
    needs_gpu = True  # its CPU path has no backward
    compiled = True
    supports_dropout = False

    def __init__(self):
        self._flex = None

    def unavailable(self, case):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401 (availability check)
        except ImportError as e:
            return f"FlexAttention not importable: {e}"
        return None

    def stream_meta(self, lens, length, batch, device):
        # The block masks depend on the query length too, so they are made on a direction's first call (the untimed
        # check or warm-up) and kept here, with the runner that owns this meta.
        return {"lens": lens, "length": length, "block_masks": {}}

    def attention(self, q, k, v, q_meta, kv_meta, dropout_p):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        if self._flex is None:
            self._flex = torch.compile(flex_attention, dynamic=False)
        kv_lens, lq, lk = kv_meta["lens"], q_meta["length"], kv_meta["length"]
        block_mask = None
        if kv_lens is not None:
            block_mask = kv_meta["block_masks"].get(lq)
            if block_mask is None:
                block_mask = create_block_mask(lambda b, h, qi, ki: ki < kv_lens[b], q.shape[0], None, lq, lk,
                                               device=q.device)
                kv_meta["block_masks"][lq] = block_mask
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        return self._flex(qh, kh, vh, block_mask=block_mask).transpose(1, 2)


class FlashAttn(Provider):
    """flash-attn's varlen kernel on packed real tokens (its best setup for ragged batches: no padded work)."""
    name = "flash_attn"
    needs_gpu = True
    packed = True

    def unavailable(self, case):
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            return f"flash_attn not importable ({e}); install the [flash] extra"
        return None

    def stream_meta(self, lens, length, batch, device):
        if lens is None:
            lens = torch.full((batch,), length, device=device)
        cu_seqlens = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
        return cu_seqlens, int(lens.max())

    def attention(self, q, k, v, q_meta, kv_meta, dropout_p):
        from flash_attn import flash_attn_varlen_func
        (cu_q, max_q), (cu_k, max_k) = q_meta, kv_meta
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p)


class Xformers(Provider):
    """xformers memory_efficient_attention on packed real tokens with a block-diagonal mask."""
    name = "xformers"
    needs_gpu = True
    packed = True

    def unavailable(self, case):
        try:
            import xformers.ops  # noqa: F401
        except ImportError as e:
            return f"xformers not importable ({e})"
        return None

    def stream_meta(self, lens, length, batch, device):
        # The block-diagonal bias pairs a query stream with a key stream: made on a direction's first call (the
        # untimed check or warm-up) and kept with the runner that owns this meta.
        return {"seqlens": [length] * batch if lens is None else lens.tolist(), "biases": {}}

    def attention(self, q, k, v, q_meta, kv_meta, dropout_p):
        import xformers.ops as xops
        bias = kv_meta["biases"].get(id(q_meta))
        if bias is None:
            bias = xops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(q_seqlen=q_meta["seqlens"],
                                                                      kv_seqlen=kv_meta["seqlens"])
            kv_meta["biases"][id(q_meta)] = bias
        # xformers takes (1, total, H, D) for variable lengths
        return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, p=dropout_p)[0]


class Ours(Provider):
    """vilbert_kernels.attention / co_attention (Triton). On the CPU only with --interpret (Triton's interpreter)."""
    name = OURS
    needs_gpu = True

    def __init__(self):
        self._module = None

    def _kernels(self):
        if self._module is None:
            self._module = importlib.import_module("vilbert_kernels.attention")
        return self._module

    def unavailable(self, case):
        try:
            module = self._kernels()
        except ImportError as e:
            return f"vilbert_kernels.attention not importable: {e}"
        if not hasattr(module, case.op):
            return f"vilbert_kernels.attention has no {case.op}"
        return None

    def attention(self, q, k, v, q_lens, kv_lens, dropout_p):
        return self._kernels().attention(q, k, v, q_lens, kv_lens, dropout_p)

    def co_attention(self, t, metas, dropout_p):
        return self._kernels().co_attention(*(t[f"{s}_{x}"] for s in ("text", "image") for x in "qkv"),
                                            metas["text"], metas["image"], dropout_p)


class OursTiles(Ours):
    """Ours with other tiles at the long square shapes: a candidate launch configuration, timed beside the default one
    (row `ours`, whose speedup_vs_ours_tiles_<label> says which is faster) so that a GPU run decides the tiles above
    128 keys. ViLBERT's shapes keep the default tiles; this provider skips them."""

    def __init__(self, label: str, configs: Dict[str, dict]):
        super().__init__()
        self.name = f"{OURS}_tiles_{label}"
        self.configs = configs  # kernel ("fwd", "bwd_dkdv", "bwd_dq") -> its launch configuration

    def unavailable(self, case):
        if case.family != "square":
            return "tile candidates run at the square shapes only"
        return super().unavailable(case)

    @contextlib.contextmanager
    def running(self):
        module = self._kernels()
        default = module.attention_launch_config
        module.attention_launch_config = lambda *args, **kwargs: {**default(*args, **kwargs), **self.configs}
        try:
            yield
        finally:
            module.attention_launch_config = default


# Long-sequence tiles as FlashAttention-style kernels use them on Hopper: 128 query rows per program in the forward and
# dQ (two warpgroups of wgmma), 128 keys per dK/dV program. Spill-free on sm_90 at head dim 64, bf16, with and without
# dropout (triton 3.6; 64x128 dK/dV spills 16 bytes with dropout, unused here: the square shapes have none).
LONG_TILE_CANDIDATES = {
    "m128n64": {"fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                "bwd_dkdv": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
                "bwd_dq": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)},
    "m128n128": {"fwd": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
                 "bwd_dkdv": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
                 "bwd_dq": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)},
}


def providers() -> List[Provider]:
    """Every provider, the reference first (the baseline of every check), then the baselines, ours and ours' tile
    candidates."""
    return [Reference(), ReferenceCompiled(), SDPA(), SDPA("FLASH_ATTENTION"), SDPA("EFFICIENT_ATTENTION"),
            SDPA("MATH"), SDPA("CUDNN_ATTENTION"), Flex(), FlashAttn(), Xformers(), Ours(),
            *(OursTiles(label, configs) for label, configs in LONG_TILE_CANDIDATES.items())]


# ----------------------------------------------------------------------------------------------------------------------
# Running one provider on one case


def pack(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return t[valid]  # (B, L, H, D) -> (total, H, D)


def unpack(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    out = t.new_zeros(*valid.shape, *t.shape[1:])  # (B, L, H, D)
    out[valid] = t
    return out


class Runner:
    """One provider's leaves (inputs requiring grad, in its layout), its forward, backward and padded views."""

    def __init__(self, provider: Provider, case: Case, inputs: Inputs, dropout_p: float):
        self.provider, self.case, self.inputs, self.dropout_p = provider, case, inputs, dropout_p
        self.valid = {}
        for stream, lens in inputs.lens.items():
            length = inputs.lengths[stream]
            if lens is None:
                lens = torch.full((case.B,), length, device=next(iter(inputs.tensors.values())).device)
            self.valid[stream] = torch.arange(length, device=lens.device)[None, :] < lens[:, None]  # (B, L)
        self.leaves = {name: self._layout(t, inputs.streams[name]).detach().requires_grad_()
                       for name, t in inputs.tensors.items()}
        self.douts = [self._layout(d, s) for d, s in zip(inputs.douts, inputs.out_streams)]
        self.metas = {s: provider.stream_meta(inputs.lens[s], inputs.lengths[s], case.B, self.douts[0].device)
                      for s in inputs.lens}

    def _layout(self, t, stream):
        return pack(t, self.valid[stream]) if self.provider.packed else t

    def padded(self, t, stream):
        return unpack(t, self.valid[stream]) if self.provider.packed else t

    def forward(self) -> Tuple[torch.Tensor, ...]:
        with self.provider.running():
            if self.case.op == "co_attention":
                return tuple(self.provider.co_attention(self.leaves, self.metas, self.dropout_p))
            q, k, v, qs, ks = directions("attention")[0]
            t = self.leaves
            return (self.provider.attention(t[q], t[k], t[v], self.metas[qs], self.metas[ks], self.dropout_p),)

    def backward(self, outs) -> None:
        with self.provider.running():
            torch.autograd.backward(outs, self.douts, retain_graph=True)

    def padded_outputs(self, outs):
        return [self.padded(o, s) for o, s in zip(outs, self.inputs.out_streams)]

    def padded_grads(self):
        return {name: self.padded(t.grad, self.inputs.streams[name]) for name, t in self.leaves.items()}


def reference_results(case: Case, inputs: Inputs, dtype: torch.dtype):
    """Outputs and grads of the reference at dropout 0: in fp32 (the truth) and in the benchmark dtype."""
    results = []
    for dt in (torch.float32, dtype):
        as_dtype = Inputs({n: t.to(dt) for n, t in inputs.tensors.items()}, inputs.streams, inputs.lens,
                          inputs.lengths, inputs.out_streams, [d.to(dt) for d in inputs.douts])
        runner = Runner(Reference(), case.without_dropout(), as_dtype, 0.0)
        outs = runner.forward()
        runner.backward(outs)
        results.append(([o.detach().float() for o in outs],
                        {n: g.float() for n, g in runner.padded_grads().items()}))
    return results


def check(runner: Runner, truth, low_precision, dtype) -> Tuple[bool, str]:
    """(correct, summary): the provider at dropout 0 vs the fp32 reference, relative to the reference's own error."""
    (ref_outs, ref_grads), (lp_outs, lp_grads) = truth, low_precision
    outs = runner.forward()
    runner.backward(outs)
    worst, verdict = [], True
    for out, ref, lp, stream in zip(runner.padded_outputs(outs), ref_outs, lp_outs, runner.inputs.out_streams):
        valid = runner.inputs.valid(stream)
        err = common.rel_error(out, ref, valid)
        tol = common.tolerance(dtype, common.rel_error(lp, ref, valid), 2.0)
        verdict &= err <= tol
        worst.append((err / tol, f"out[{stream}] rel err {err:.2e} (tol {tol:.1e})"))
    for name, grad in runner.padded_grads().items():
        err = common.rel_error(grad, ref_grads[name])
        tol = common.tolerance(dtype, common.rel_error(lp_grads[name], ref_grads[name]), 3.0)
        verdict &= err <= tol
        worst.append((err / tol, f"d{name} rel err {err:.2e} (tol {tol:.1e})"))
    return bool(verdict), "vs fp32 reference at dropout 0: worst " + max(worst)[1]


def dropout_check(runner: Runner, no_dropout_outs) -> Optional[str]:
    """With dropout the output must be finite and differ from the no-dropout output; returns the failure or None."""
    outs = runner.forward()  # with autograd on, as timed (no_grad would make torch.compile compile once more)
    for out, ref, stream in zip(runner.padded_outputs(outs), no_dropout_outs, runner.inputs.out_streams):
        valid = runner.inputs.valid(stream)
        err = common.rel_error(out, ref, valid)
        if not math.isfinite(err):
            return f"dropout run gave non-finite output[{stream}]"
        if err < 1e-3:
            return f"dropout_p={runner.dropout_p} output[{stream}] equals the no-dropout output (rel diff {err:.1e})"
    return None


def flops(case: Case, mode: str) -> float:
    pairs = 2 * case.Lq * case.Lk if case.op == "co_attention" else case.Lq * case.Lk
    fwd = 4 * case.B * case.H * case.D * pairs
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def min_bytes(case: Case, mode: str, elem: int) -> float:
    """Minimal bytes moved (see the module docstring): each input read once, each output written once, fp32 LSE."""
    if case.op == "co_attention":
        q_set = kv_set = case.B * case.H * case.D * (case.Lq + case.Lk) * elem  # both directions: one set per stream
        lse = case.B * case.H * (case.Lq + case.Lk) * 4
    else:
        q_set, kv_set = (case.B * case.H * case.D * L * elem for L in (case.Lq, case.Lk))
        lse = case.B * case.H * case.Lq * 4
    fwd = 2 * q_set + 2 * kv_set + lse  # read q, k, v; write o, lse
    bwd = 4 * q_set + 4 * kv_set + lse  # read q, o, dO, k, v, lse; write dq, dk, dv
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# ----------------------------------------------------------------------------------------------------------------------
# The suite


def run(results: common.Results, options: common.Options, budget: common.Budget, ceilings: dict) -> None:
    on_gpu = common.device().type == "cuda"
    dtype = options.dtype if on_gpu else torch.float32
    common.raise_recompile_limit()
    everyone = providers()
    ours_at = [p.name for p in everyone].index(OURS)
    everyone = everyone[:ours_at] + list(options.extra_providers) + everyone[ours_at:]
    if options.providers:
        everyone = [p for p in everyone if p.name in options.providers or p.name == "reference"]
    verdicts: Dict[tuple, Tuple[bool, str]] = {}  # (dropout-0 case, provider) -> check, shared by both dropouts
    all_cases = cases(on_gpu, options.quick)
    # Two passes: the providers that need no compilation over every case first, then the torch.compile ones (tens of
    # seconds of compilation per shape), so that a time budget cuts compiled baselines before it cuts cases.
    for group in ([p for p in everyone if not p.compiled], [p for p in everyone if p.compiled]):
        for case in all_cases:
            run_case(results, case, group, dtype, options, budget, ceilings, verdicts)
    order = {(c.op, json.dumps(c.shape(), sort_keys=True), c.dropout_p): i for i, c in enumerate(all_cases)}
    names = [p.name for p in everyone]
    results.rows.sort(key=lambda r: (order[r["op"], json.dumps(r["shape"], sort_keys=True), r["dropout_p"]],
                                     names.index(r["provider"]), common.MODES.index(r["mode"])))
    common.add_speedups(results.rows, SPEEDUP_BASELINES)


def run_case(results, case: Case, group: List[Provider], dtype, options, budget, ceilings, verdicts) -> None:
    dev = common.device()
    base = dict(op=case.op, shape=case.shape(), dtype=common.DTYPE_NAMES[dtype], dropout_p=case.dropout_p)
    inputs = truth = None
    for provider in group:
        reason = skip_reason(provider, case, dev.type == "cuda", options, budget)
        if reason:
            for mode in common.MODES:
                results.add(common.skipped_row(reason, mode=mode, provider=provider.name, **base))
            continue
        if inputs is None:  # drawn lazily, so a case every provider skips costs nothing; the dropout 0 and 0.1
            # variants of a shape draw the same inputs
            inputs = make_inputs(case, dtype, dev, seed=zlib.crc32(repr(case.without_dropout()).encode()))
            truth = reference_results(case, inputs, dtype)
        for row in run_provider(provider, case, inputs, truth, verdicts, ceilings, options.quick):
            results.add({**row, **base})
    del inputs, truth
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def skip_reason(provider: Provider, case: Case, on_gpu: bool, options: common.Options,
                budget: common.Budget) -> Optional[str]:
    reason = common.skip_reason(provider.name, provider.compiled, provider.needs_gpu, on_gpu, options, budget)
    if reason is None and case.dropout_p > 0 and not provider.supports_dropout:
        return f"{provider.name} has no dropout (dropout_p={case.dropout_p})"
    return reason or provider.unavailable(case)


def run_provider(provider: Provider, case: Case, inputs: Inputs, truth, verdicts: dict, ceilings: dict,
                 quick: bool) -> List[dict]:
    """Check, then time the three modes; one row per mode (skipped, wrong and failed rows carry the reason)."""
    dtype = inputs.douts[0].dtype
    key = (case.without_dropout(), provider.name)
    note = None
    try:
        if key not in verdicts:
            with common.poisoned_empty(not provider.compiled):
                verdicts[key] = check(Runner(provider, case.without_dropout(), inputs, 0.0), *truth, dtype)
        correct, summary = verdicts[key]
        runner = Runner(provider, case, inputs, case.dropout_p)
        if correct and case.dropout_p > 0:
            failure = dropout_check(runner, truth[0][0])
            if failure:
                correct, summary = False, failure
            else:
                note = "checked at dropout 0 on the same inputs; the dropout output differs from that one"
        if not correct:
            return [common.make_row(mode=m, provider=provider.name, correct=False, check=summary,
                                    skipped="wrong result: not timed") for m in common.MODES]
        return [time_mode(runner, mode, case, ceilings, quick, summary, note) for mode in common.MODES]
    except Skip as e:
        return [common.skipped_row(str(e), mode=m, provider=provider.name) for m in common.MODES]
    except Exception as e:  # one broken provider must not end the suite: report it and go on
        traceback.print_exc()  # the row keeps one line; the log keeps the whole story
        msg = f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:400]
        return [common.skipped_row(msg, mode=m, provider=provider.name) for m in common.MODES]


def time_mode(runner: Runner, mode: str, case: Case, ceilings: dict, quick: bool, summary: str,
              note: Optional[str]) -> dict:
    leaves = list(runner.leaves.values())
    if mode == "fwd":
        fn = runner.forward
    elif mode == "bwd":
        outs = runner.forward()

        def fn():  # backward again through the same retained graph
            runner.backward(outs)
    else:
        def fn():
            runner.backward(runner.forward())
    mem = common.peak_mem_mb(fn)
    for t in leaves:
        t.grad = None
    p50, p20, p80 = common.time_ms(fn, grad_to_none=leaves, quick=quick)
    gbps = min_bytes(case, mode, runner.douts[0].element_size()) / p50 / 1e6
    copy = ceilings.get("copy_gbps")
    return common.make_row(
        mode=mode, provider=runner.provider.name, ms_p50=p50, ms_p20=p20, ms_p80=p80,
        tflops=flops(case, mode) / p50 / 1e9, gbps=gbps, pct_of_copy_bw=100 * gbps / copy if copy else None,
        peak_mem_mb=mem, correct=True, check=summary, note=note)


def plot_x(row: dict) -> Optional[float]:
    """Sequence length of a row for the plots: the longer of its two lengths."""
    s = row["shape"]
    return max(s.get("Lq", 0), s.get("Lk", 0), s.get("T", 0), s.get("V", 0)) or None


def plot_panel(row: dict) -> str:
    """ViLBERT's pretraining and downstream shapes share a panel (two lengths); the square shapes have their own."""
    return row["shape"]["family"] if row["shape"]["family"] == "square" else "ViLBERT shapes"


SPEEDUP_BASELINES = ("reference", "sdpa")  # speedup_vs_<these> always present on our rows
X_LABEL = "sequence length (longer of Lq, Lk)"


METHOD = {
    "timing": "GPU: triton.testing.do_bench (CUDA events, warm-up, L2 flushed before each call, grads reset), "
              "median and p20/p80; CPU: perf_counter, proves the harness only",
    "tflops": "4*B*H*Lq*Lk*D per direction forward over PADDED lengths; bwd 2.5x, fwd+bwd 3.5x",
    "gbps": "minimal bytes (q,k,v read + o, fp32 LSE written fwd; q,k,v,o,dO,LSE read + dq,dk,dv written bwd) / time; "
            "pct_of_copy_bw against the copy bandwidth measured in this run",
    "peak_mem_mb": "peak allocated during one call above what was allocated before it (bwd: during the backward, "
                   "above the memory held after the forward)",
    "correct": "dropout 0 at the benchmark shape and dtype vs the reference in fp32: output on valid query rows and "
               "grads (dO zero on padded query rows), tolerance 2x (3x grads) the reference's own error in that dtype "
               "+ floor; dropout>0 rows also require a finite output that differs from the dropout-0 one",
    "modes": "fwd with autograd recording (training forward); bwd = backward of a retained graph; fwd+bwd = both",
    "baselines": "co_attention baselines run two calls (text->image, image->text); flash_attn/xformers on packed "
                 "real tokens (inputs packed outside the timing); sdpa with a boolean key-padding mask",
}
