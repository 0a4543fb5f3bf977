"""ViLBERT pretraining (masked language modelling + masked region KL + image-text alignment) with DeepSpeed.

Launch (batch sizes in the JSON are global -- train_batch_size and the micro batch per rank; DeepSpeed derives the
gradient accumulation -- so one file fits every world size):

    # any CPU machine, the built-in synthetic data (generated on first use); ~7 minutes on 2 cores, ending near
    # mlm_acc 0.73, align_acc 0.75 (held-out numbers: train/evaluate_pretraining.py --init runs/pretrain/final):
    deepspeed --num_gpus 1 train/pretrain.py --deepspeed_config train/ds_cpu.json --max_steps 1200
    # one GPU: bf16 with fp32 gradient accumulation, ZeRO-2, the Triton kernels:
    deepspeed --num_gpus 1 train/pretrain.py --deepspeed_config train/ds.json --model vilbert-base \
        --data /data/cc_features --init_bert bert-base-uncased/
    # eight GPUs on one node (same command, --num_gpus 8); several nodes, hostfile lines "node1 slots=8",
    # ZeRO-3 when the model does not fit:
    deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 train/pretrain.py --deepspeed_config train/ds_zero3.json ...
    # several CPU ranks (DeepSpeed counts CPU devices from LOCAL_SIZE):
    LOCAL_SIZE=2 OMP_NUM_THREADS=1 deepspeed --num_gpus 2 train/pretrain.py --deepspeed_config train/ds_cpu.json

With no GPU any config runs on the CPU with gloo, in fp32: a bf16 config has bf16 turned off (one line at start says
so); fp16 on a CPU is an error. Configs: ds.json (ZeRO-2), ds_zero1.json, ds_zero3.json (GPU, bf16, global batch 512 as
the paper), ds_cpu.json (fp32, ZeRO-2, batch 128, peak lr 2e-3 for the small demo model). All: torch's AdamW (no
fused-Adam JIT build), betas (0.9, 0.98), eps 1e-8, weight decay 0.01 except biases and LayerNorm weights (the
parameter groups are built here), gradient clipping 1.0, WarmupDecayLR with linear warmup: `total_num_steps` is filled
in from --max_steps (or --epochs in optimizer steps) and `warmup_num_steps` with 10% of it unless the JSON gives them.
TensorBoard: set "tensorboard": {"enabled": true} in the JSON (needs `pip install tensorboard`); it writes to
output_dir/tensorboard.

Stopping: SIGTERM or SIGINT (Ctrl-C) on any rank lets the current optimizer step finish, saves a checkpoint on every
rank and exits 0. Signal the ranks, or the launcher's process group (`kill -TERM -<pgid>`; Ctrl-C in a terminal does):
the `deepspeed` command itself does not forward SIGTERM on one node (its child, deepspeed.launcher.launch, forwards it
to the ranks and kills them 30 s later). Running the same
command again resumes from the newest complete checkpoint in --output_dir at the next unseen sample, with the RNG
states restored (same world size, seed, data and batch sizes: another is refused; --no_resume starts over, moving
the earlier run's checkpoints and logs to output_dir/previous_runs/).

output_dir: global_step<N>/ (DeepSpeed checkpoints; the last --keep_last kept), `latest` (the newest complete one,
replaced atomically after every rank has written its part), metrics.jsonl, final/ (`save_pretrained` of the fp32
weights, consolidated from the ZeRO shards; load with ViLBERTForPretraining.from_pretrained, or
SingleStreamForPretraining.from_pretrained after --architecture single-stream).

--architecture single-stream trains the paper's single-stream baseline (SingleStreamForPretraining: one BERT over the
text tokens and the projected regions, the same heads, losses, data and schedule) for a like-for-like comparison.

metrics.jsonl, one line per --log_interval steps, averaged over the window and all ranks: step, samples (global),
epoch, lr, loss (= mlm_loss + region_loss + align_loss), mlm_acc (over masked tokens), align_acc, samples_per_s,
tflops (analytic model FLOPs per second of all ranks together, see `train_flops`), data_wait (the share of the time
spent waiting for batches: near 0 when the DataLoader keeps up, else raise --num_workers; with 0 workers, the share
spent loading), max_mem_mb (rank 0: peak GPU memory allocated, or peak RSS on the CPU).

The loop itself (schedule, checkpoints, resuming, metrics.jsonl) is train/loop.py, shared with train/finetune.py.
"""
import argparse
import functools
import os
import sys

import torch

try:
    import deepspeed.comm as dist
except ModuleNotFoundError as error:  # `pip install -e .` leaves DeepSpeed out: the train extra brings it
    sys.exit(f"{os.path.basename(__file__)}: error: {error}; install the train extra: pip install -e '.[train]'")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loop import (UsageError, add_run_arguments, build_config, check_run_arguments, default_workers,  # noqa: E402
                  fp32_weights, gpu_available, init_distributed, load_ds_config, train, world_from_env)

from vilbert import SingleStreamForPretraining, ViLBERTForPretraining  # noqa: E402
from vilbert.config import default_backend  # noqa: E402
from vilbert.model import pretraining_hits  # noqa: E402
from vilbert.data import (IGNORE_INDEX, PretrainCollator, PretrainDataset, ensure_default_data,  # noqa: E402
                          load_tokenizer, open_store)

LOSS_NAMES = ("loss", "mlm_loss", "region_loss", "align_loss")
ARCHITECTURES = {"two-stream": ViLBERTForPretraining, "single-stream": SingleStreamForPretraining}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="feature store path (default: the built-in synthetic data)")
    parser.add_argument("--model", default="small", help="config preset name or config JSON path (default: small)")
    parser.add_argument("--architecture", choices=tuple(ARCHITECTURES), default="two-stream",
                        help="ViLBERT (two-stream, default) or the paper's single-stream baseline")
    parser.add_argument("--init_bert", help="BERT checkpoint dir for the text stream")
    parser.add_argument("--vocab_file", help="WordPiece vocab.txt (default: <init_bert>/vocab.txt if there, else the "
                                             "vocab of the built-in data)")
    add_run_arguments(parser, output_dir="runs/pretrain")
    parser.add_argument("--drop_masked_loss_on_negatives", action="store_true",
                        help="no MLM/region loss on pairs whose caption was swapped")
    return check_run_arguments(parser.parse_args(argv), cpu_config="train/ds_cpu.json")


def train_flops(config, text_lens, image_lens, num_mlm_targets, num_region_targets, architecture="two-stream"):
    """Analytic training FLOPs of one micro batch: 6 per multiply-add of every matmul (2 forward, 4 backward).

    Counted from the config per real (unpadded) token and region: each layer's projections and FFN (the weights a
    position touches) and its attention matmuls (scores and context: 2 x length x width per query); the image
    embedding; the MLM and region heads on their targets only (as the model computes them). (The benchmark's
    `model_flops_per_sample` counts the linear layers at the padded lengths, without attention matmuls or the region
    head, so its TFLOP/s are not comparable with these.)
    Padding, softmax, LayerNorm, GELU and the poolers are left out (no matmuls or negligible). Single-stream: the
    text layers run over tokens and regions together, at the text width.
    """
    c = config
    t, v = text_lens.double(), image_lens.double()
    if architecture == "single-stream":
        h = c.hidden_size
        per_position = c.num_hidden_layers * (4 * h ** 2 + 2 * h * c.intermediate_size)
        per_region = (c.v_feature_size + 5) * h
        attention = 2 * c.num_hidden_layers * h * (t + v) ** 2
        heads = num_mlm_targets * (h ** 2 + h * c.vocab_size) + num_region_targets * (h ** 2 + h * c.v_target_size)
        return 6 * float(((t + v) * per_position + v * per_region + attention).sum() + heads)
    co = len(c.v_biattention_id)  # co-layers
    per_token = (c.num_hidden_layers * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size)
                 + co * (4 * c.hidden_size * c.bi_hidden_size + 2 * c.hidden_size * c.intermediate_size))
    per_region = (c.v_num_hidden_layers * (4 * c.v_hidden_size ** 2 + 2 * c.v_hidden_size * c.v_intermediate_size)
                  + co * (4 * c.v_hidden_size * c.bi_hidden_size + 2 * c.v_hidden_size * c.v_intermediate_size)
                  + (c.v_feature_size + 5) * c.v_hidden_size)
    attention = (2 * c.num_hidden_layers * c.hidden_size * t * t
                 + 2 * c.v_num_hidden_layers * c.v_hidden_size * v * v
                 + 4 * co * c.bi_hidden_size * t * v)
    heads = (num_mlm_targets * (c.hidden_size ** 2 + c.hidden_size * c.vocab_size)
             + num_region_targets * (c.v_hidden_size ** 2 + c.v_hidden_size * c.v_target_size))
    return 6 * float((t * per_token + v * per_region + attention).sum() + heads)


def pretraining_step(engine, batch, config, architecture):
    """One micro batch forward (loop.train's micro_step): the loss, and the sums logged per window: on the device the
    four losses, MLM correct and target counts, alignment correct; on the host the pair count and analytic FLOPs."""
    flops = train_flops(config, batch["text_lens"], batch["image_lens"],
                        int((batch["mlm_labels"] != IGNORE_INDEX).sum()), int(batch["region_mask"].sum()), architecture)
    batch = {k: t.to(engine.device, non_blocking=True) for k, t in batch.items()}
    input_dtype = (torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled()
                   else torch.float32)
    for key in ("image_features", "image_locations"):  # the model's inputs in its dtype (bf16 on GPUs)
        batch[key] = batch[key].to(input_dtype)
    out = engine(**batch)
    with torch.no_grad():
        hits = pretraining_hits(out, batch["mlm_labels"], batch["is_aligned"])
        on_device = torch.stack([*(getattr(out, name).double() for name in LOSS_NAMES), *(h.double() for h in hits)])
    return out.loss, on_device, [len(batch["is_aligned"]), flops]


def summarize(sums, micro_steps, seconds):
    """metrics.jsonl fields from a window's sums over all ranks (see pretraining_step)."""
    *loss_sums, mlm_correct, mlm_count, align_correct, pairs, flops = sums
    return {**{name: value / micro_steps for name, value in zip(LOSS_NAMES, loss_sums)},
            "mlm_acc": mlm_correct / max(mlm_count, 1), "align_acc": align_correct / pairs,
            "tflops": flops / seconds / 1e12}


def main(argv=None):
    rank, world_size = world_from_env(master_port=29500)
    on_gpu = gpu_available()
    try:
        args = parse_args(argv)
        ds_config, device_note = load_ds_config(args.deepspeed_config, world_size, on_gpu)
        if args.data is not None and not os.path.exists(args.data):
            raise UsageError(f"--data {args.data!r} does not exist")
        if args.init_bert is not None and not os.path.isdir(args.init_bert):
            raise UsageError(f"--init_bert {args.init_bert!r} is not a directory")
        if args.vocab_file is None and args.init_bert and os.path.isfile(os.path.join(args.init_bert, "vocab.txt")):
            args.vocab_file = os.path.join(args.init_bert, "vocab.txt")
        if args.vocab_file is not None and not os.path.isfile(args.vocab_file):
            raise UsageError(f"--vocab_file {args.vocab_file!r} does not exist")
        tokenizer = load_tokenizer(args.vocab_file)
        config = build_config(args.model, tokenizer.vocab_size)
    except UsageError as e:
        if rank == 0:
            print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 2
    args.backend = args.backend or default_backend(on_gpu)
    default_workers(args, on_gpu)

    init_distributed(on_gpu)
    if rank == 0:
        print(f"pretrain.py: {device_note}, {world_size} rank(s), backend {args.backend}, {args.architecture}",
              flush=True)
    if args.data is None and int(os.environ["LOCAL_RANK"]) == 0:
        ensure_default_data()  # one writer per node; the others wait at the barrier
    dist.barrier()
    dataset = PretrainDataset(open_store(args.data or ensure_default_data()), tokenizer, seed=args.seed,
                              drop_masked_loss_on_negatives=args.drop_masked_loss_on_negatives)
    micro = ds_config["train_micro_batch_size_per_gpu"]
    if len(dataset) < micro * world_size:  # every rank sees the same sizes: all return here
        if rank == 0:
            print(f"pretrain.py: error: {args.data or 'the built-in data'} has {len(dataset)} samples, fewer than one "
                  f"micro batch per rank ({micro} x {world_size} ranks)", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model_class = ARCHITECTURES[args.architecture]
    model = model_class(config, backend=args.backend)
    if args.init_bert:
        try:
            report = model.load_bert(args.init_bert)
        except (ValueError, FileNotFoundError) as e:  # the same on every rank: all return here
            if rank == 0:
                print(f"pretrain.py: error: --init_bert: {e}", file=sys.stderr)
            return 2
        if rank == 0:
            print(f"pretrain.py: text stream from {args.init_bert}: {report}", flush=True)
    engine, finished = train(args, model, dataset, PretrainCollator(), ds_config,
                             functools.partial(pretraining_step, config=config, architecture=args.architecture),
                             summarize)
    if not finished:
        return 0
    if rank == 0:
        final = os.path.join(args.output_dir, "final")
        export = model_class(config, backend="torch")
        export.load_state_dict(fp32_weights(engine, args.output_dir))
        export.save_pretrained(final)
        print(f"pretrain.py: done, {engine.global_steps} steps; weights in {final}")
    # No collective after training: the other ranks end while rank 0 exports (a barrier would time out on a long one).
    return 0


if __name__ == "__main__":
    sys.exit(main())
