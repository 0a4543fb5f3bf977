"""Suite `model`: one ViLBERT pretraining step (forward, backward, optimizer step) per backend.

Providers: reference = backend "torch" eager (vilbert_kernels.reference), reference_compiled = backend "torch" under
torch.compile, sdpa = backend "sdpa", ours = backend "triton". `vilbert-base` at the pretraining shape (T=36 tokens,
V=37 regions, ragged as in the kernels suite) on a GPU, B=256 first (halved on out-of-memory; the row says which B);
`tiny` at B=4 on the CPU.

Precision as train/ds.json runs it (DeepSpeed bf16): the model's weights and activations in bf16, fp32 master
weights updated by AdamW (0.9, 0.98, eps 1e-8, wd 0.01; fused on the GPU), copied back to bf16 after each step. The
CPU runs fp32.

Timing: 3 warm-up steps (compilation included there), then CUDA events around each of 10 steps (5 with --quick);
median and p20/p80. peak_mem_mb is the absolute peak allocated over the timed steps (weights, master weights,
optimizer state, activations).

Model FLOPs (2 FLOP per multiply-add, the linear layers at the padded lengths): per sample,
text layers T*L_t*2(4h^2 + 2h*ffn), visual layers V*L_v*2(4vh^2 + 2vh*vffn), co-layers T*2(4h*bi + 2h*ffn) +
V*2(4vh*bi + 2vh*vffn) each, the image embedding V*2*2048*vh, the MLM head on the masked tokens only
(2h^2 + 2h*vocab each); training = 3x forward. MFU = model FLOP/s over the bf16 matmul rate measured in this run.
(train/pretrain.py's tflops count real lengths and attention too: the two are not comparable.)

Correctness before timing: in eval mode (no dropout) each backend's logits and loss on the benchmark batch are
compared with backend "torch" in fp32 (same weights); tolerance 2x the error of backend "torch" in the benchmark dtype
plus a floor.
"""
import time
import traceback
from typing import List, Optional

import torch

from . import common
from .common import OURS, Skip

# provider name -> (ViLBERT backend, compiled)
BACKENDS = {"reference": ("torch", False), "sdpa": ("sdpa", False), OURS: ("triton", False),
            "reference_compiled": ("torch", True)}  # compiled last: its first step compiles the whole model


def make_batch(config, B: int, T: int, V: int, device, seed: int = 0) -> dict:
    """A synthetic pretraining batch with the keys, dtypes and layout of vilbert.data.PretrainCollator (padding at the
    end)."""
    from vilbert.model import IGNORE_INDEX
    gen = torch.Generator().manual_seed(seed)
    text_lens = torch.normal(0.6 * T, 0.2 * T, (B,), generator=gen).round().clamp(3, T).long()
    image_lens = torch.randint(min(10, V - 1), V, (B,), generator=gen) + 1  # regions + the IMG token
    text_valid = torch.arange(T)[None, :] < text_lens[:, None]  # (B, T)
    image_valid = torch.arange(V)[None, :] < image_lens[:, None]  # (B, V)
    input_ids = torch.randint(5, config.vocab_size, (B, T), generator=gen) * text_valid
    maskable = text_valid.clone()
    maskable[:, 0] = False
    maskable[torch.arange(B), text_lens - 1] = False  # [CLS] and [SEP] are never targets
    mlm_targets = maskable & (torch.rand(B, T, generator=gen) < 0.15)
    regions = image_valid.clone()
    regions[:, 0] = False  # the IMG token is never masked
    x1y1 = torch.rand(B, V, 2, generator=gen) * 0.5
    x2y2 = x1y1 + torch.rand(B, V, 2, generator=gen) * 0.5
    area = ((x2y2 - x1y1).prod(-1, keepdim=True))
    locations = torch.cat([x1y1, x2y2, area], -1) * image_valid[..., None]
    locations[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    features = torch.randn(B, V, config.v_feature_size, generator=gen).relu() * image_valid[..., None]
    region_mask = regions & (torch.rand(B, V, generator=gen) < 0.15)
    batch = {
        "input_ids": input_ids,
        "token_type_ids": torch.zeros(B, T, dtype=torch.long),
        "text_lens": text_lens,
        "image_features": features,
        "image_locations": locations,
        "image_lens": image_lens,
        "mlm_labels": torch.where(mlm_targets, input_ids, torch.full_like(input_ids, IGNORE_INDEX)),
        "region_mask": region_mask,  # and the collator's targets: one row per masked region
        "region_targets": torch.softmax(torch.randn(int(region_mask.sum()), config.v_target_size, generator=gen) * 3,
                                        -1),
        "is_aligned": torch.randint(0, 2, (B,), generator=gen),
    }
    return {k: v.to(device) for k, v in batch.items()}


def as_dtype(batch: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def model_flops_per_sample(config, T: int, V: int, masked_tokens: float) -> float:
    """Forward + backward FLOPs of one sample (see the module docstring), 3x the forward."""
    h, ffn, vh, vffn, bi = (config.hidden_size, config.intermediate_size, config.v_hidden_size,
                            config.v_intermediate_size, config.bi_hidden_size)
    text = T * config.num_hidden_layers * 2 * (4 * h * h + 2 * h * ffn)
    image = V * config.v_num_hidden_layers * 2 * (4 * vh * vh + 2 * vh * vffn)
    co = len(config.v_biattention_id) * (T * 2 * (4 * h * bi + 2 * h * ffn) + V * 2 * (4 * vh * bi + 2 * vh * vffn))
    embed = V * 2 * config.v_feature_size * vh
    mlm = masked_tokens * (2 * h * h + 2 * h * config.vocab_size)
    return 3.0 * (text + image + co + embed + mlm)


class MasterWeightAdamW:
    """AdamW on fp32 master copies of low-precision parameters (what DeepSpeed's bf16 mode does on one GPU)."""

    def __init__(self, params, fused: bool):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01,
                                     fused=fused or None)

    def step(self):
        for m, p in zip(self.master, self.params):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                p.copy_(m)
                p.grad = None


def load_model_api():
    try:
        from vilbert import ViLBERTConfig, ViLBERTForPretraining
    except ImportError as e:
        raise Skip(f"the model is not importable yet: {e}") from None
    return ViLBERTConfig, ViLBERTForPretraining


def run(results: common.Results, options: common.Options, budget: common.Budget, ceilings: dict) -> None:
    dev = common.device()
    on_gpu = dev.type == "cuda"
    dtype = options.dtype if on_gpu else torch.float32
    preset, T, V = ("vilbert-base", 36, 37) if on_gpu else ("tiny", 12, 10)
    B = options.batch_size or (256 if on_gpu else 4)
    base = dict(op=f"train_step:{preset}", mode="step", dtype=common.DTYPE_NAMES[dtype], dropout_p=0.1)
    names = [n for n in BACKENDS if not options.providers or n in options.providers or n == "reference"]
    try:
        ViLBERTConfig, model_class = load_model_api()
        config = ViLBERTConfig.preset(preset)
        torch.manual_seed(0)
        template = build(model_class, config, "torch", None, torch.float32)  # the weights every backend loads
        # The check runs on 32 samples: the same maths as the timed batch, at a size that fits next to it.
        check_batch = make_batch(config, min(B, 32), T, V, dev, seed=1)
        truth = eval_outputs(template, check_batch, torch.float32)
        low = eval_outputs(build(model_class, config, "torch", template, dtype), check_batch, dtype)
        template.cpu()  # kept off the GPU (with the checks' outputs), so peak memory is each backend's own
    except Exception as e:
        reason = str(e) if isinstance(e, Skip) else f"error building the model: {type(e).__name__}: {e}"
        for name in names:
            results.add(common.skipped_row(reason, provider=name, shape={"preset": preset, "B": B, "T": T, "V": V},
                                           **base))
        return
    common.raise_recompile_limit()
    for name in names:
        backend, compiled = BACKENDS[name]
        reason = common.skip_reason(name, compiled, False, on_gpu, options, budget)
        shape = {"preset": preset, "B": B, "T": T, "V": V}
        if reason:
            results.add(common.skipped_row(reason, provider=name, shape=shape, **base))
            continue
        try:
            model = build(model_class, config, backend, template, dtype)
            correct, summary = check(model, check_batch, truth, low, dtype)
            if correct:
                row = time_backend(model, config, preset, name, compiled, B, T, V, dtype, options.quick, ceilings)
                # Checking the compiled model would compile it a second time, in eval mode (a minute of the GPU
                # suite): the row says what was checked.
                row["check"] = summary + ("; the eager model was checked, its torch.compile is timed unchecked"
                                          if compiled else "")
            else:
                row = common.make_row(provider=name, shape=shape, correct=False, check=summary,
                                      skipped="wrong result: not timed")
        except Skip as e:
            row = common.skipped_row(str(e), provider=name, shape=shape)
        except Exception as e:  # one broken backend must not end the suite
            traceback.print_exc()  # the row keeps one line; the log keeps the whole story
            row = common.skipped_row(f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:400],
                                     provider=name, shape=shape)
        model = None
        results.add({**row, **base})
        if on_gpu:
            torch.cuda.empty_cache()
    common.add_speedups(results.rows, SPEEDUP_BASELINES)


def build(model_class, config, backend: str, template, dtype):
    """A model of `backend` on the benchmark device (initialised there: fast), with the template's weights."""
    with common.device():
        model = model_class(config, backend=backend)
    if template is not None:
        model.load_state_dict(template.state_dict())
    return model.to(dtype).train()



def eval_outputs(model, batch, dtype) -> dict:
    """Logits and loss in eval mode (no dropout), as fp32."""
    model.eval()
    with torch.no_grad():
        out = model(**as_dtype(batch, dtype))
    model.train()
    return {k: getattr(out, k).float().cpu() for k in ("mlm_logits", "region_logits", "align_logits", "loss")}


def check(model, batch, truth, low, dtype) -> tuple:
    """(correct, summary): eval-mode logits and loss vs backend torch in fp32, relative to torch's own dtype error."""
    got = eval_outputs(model, batch, dtype)
    worst, verdict = [], True
    for k in truth:
        err = common.rel_error(got[k], truth[k])
        tol = common.tolerance(dtype, common.rel_error(low[k], truth[k]), 2.0)
        verdict &= err <= tol
        worst.append((err / tol, f"{k} rel err {err:.2e} (tol {tol:.1e})"))
    return bool(verdict), "eval mode vs backend torch fp32: worst " + max(worst)[1]


def time_backend(model, config, preset, name, compiled, B, T, V, dtype, quick, ceilings) -> dict:
    """Times training steps at batch B, halving B on out-of-memory; the row records the B that ran."""
    on_gpu = common.device().type == "cuda"
    forward = torch.compile(model) if compiled else model
    optimizer = MasterWeightAdamW(model.parameters(), fused=on_gpu)
    while True:
        batch = as_dtype(make_batch(config, B, T, V, common.device()), dtype)

        def step():
            forward(**batch).loss.backward()
            optimizer.step()

        try:
            # (the CPU proves the harness only: fewer steps)
            times = time_steps(step, *((3, 5 if quick else 10) if on_gpu else (1, 3)))
            break
        except torch.cuda.OutOfMemoryError:
            batch = None
            for p in model.parameters():
                p.grad = None
            torch.cuda.empty_cache()
            if B == 1:
                raise
            B //= 2
    p50, p20, p80 = common.quantiles_ms(times)
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu else None
    from vilbert.model import IGNORE_INDEX
    masked = float((batch["mlm_labels"] != IGNORE_INDEX).sum()) / B
    flops = model_flops_per_sample(config, T, V, masked) * B
    tflops = flops / p50 / 1e9
    matmul = ceilings.get("bf16_matmul_tflops")
    return common.make_row(
        provider=name, shape={"preset": preset, "B": B, "T": T, "V": V}, ms_p50=p50, ms_p20=p20, ms_p80=p80,
        tflops=tflops, peak_mem_mb=peak, correct=True, samples_per_s=B / p50 * 1e3, batch_size=B,
        mfu=tflops / matmul if matmul and dtype == torch.bfloat16 else None, model_tflop_per_step=flops / 1e12,
        note=f"backend={model.config.backend}{' compiled' if compiled else ''}, {masked:.1f} MLM targets/sample")


def time_steps(step, warmup: int, steps: int) -> List[float]:
    """Milliseconds of each timed step: CUDA events on a GPU (the peak-memory counter reset after the warm-up)."""
    for _ in range(warmup):
        step()
    if common.device().type != "cuda":
        out = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            out.append((time.perf_counter() - start) * 1e3)
        return out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def plot_x(row: dict) -> Optional[float]:
    return row["shape"].get("B") if isinstance(row["shape"], dict) else None


SPEEDUP_BASELINES = ("reference", "sdpa")  # speedup_vs_<these> always present on our rows
X_LABEL = "batch size"

METHOD = {
    "step": "forward + backward + AdamW on fp32 master weights (DeepSpeed bf16 style), dropout on, train mode",
    "timing": "3 warm-up steps, then CUDA events around each of 10 steps (5 quick); median and p20/p80",
    "tflops": "analytic model FLOPs (linear layers at padded lengths, MLM head on masked tokens, 3x "
              "forward) / step time; mfu against the bf16 matmul rate measured in this run",
    "peak_mem_mb": "absolute peak allocated over the timed steps",
    "correct": "eval mode logits + loss vs backend torch in fp32 on the same weights and batch; tolerance 2x torch's "
               "own error in the benchmark dtype + floor",
}
