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
rank and exits 0 (the DeepSpeed launcher forwards SIGTERM to the ranks and kills them 30 s later). Running the same
command again resumes from the newest complete checkpoint in --output_dir at the next unseen sample, with the RNG
states restored (same world size; --no_resume starts over).

output_dir: global_step<N>/ (DeepSpeed checkpoints; the last --keep_last kept), `latest` (the newest complete one,
replaced atomically after every rank has written its part), metrics.jsonl, final/ (`save_pretrained` of the fp32
weights, consolidated from the ZeRO shards; load with ViLBERTForPretraining.from_pretrained, or
SingleStreamForPretraining.from_pretrained after --architecture single-stream).

--architecture single-stream trains the paper's single-stream baseline (SingleStreamForPretraining: one BERT over the
text tokens and the projected regions, the same heads, losses, data and schedule) for a like-for-like comparison.

metrics.jsonl, one line per --log_interval steps, averaged over the window and all ranks: step, samples (global),
epoch, lr, loss (= mlm_loss + region_loss + align_loss), mlm_acc (over masked tokens), align_acc, samples_per_s,
tflops (analytic model FLOPs per second of all ranks together, see `train_flops`), max_mem_mb (rank 0: peak GPU memory
allocated, or peak RSS on the CPU).
"""
import argparse
import glob
import json
import os
import random
import resource
import shutil
import signal
import sys
import time

import deepspeed
import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from torch.utils.data import DataLoader
from tqdm import tqdm

from vilbert import SingleStreamForPretraining, ViLBERTConfig, ViLBERTForPretraining
from vilbert.data import (IGNORE_INDEX, PretrainCollator, PretrainDataset, ResumableSampler, ensure_default_data,
                          load_tokenizer, open_store)

# The running script ("pretrain.py", or "finetune.py", which shares these helpers), for messages.
PROGRAM = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else "pretrain.py"
METRIC_NAMES = ("loss", "mlm_loss", "region_loss", "align_loss")
ARCHITECTURES = {"two-stream": ViLBERTForPretraining, "single-stream": SingleStreamForPretraining}


class UsageError(Exception):
    """A bad argument or config, found before any collective: printed as one line, exit status 2."""


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
    return check_run_arguments(parser.parse_args(argv))


GPU_WORKERS = 2  # DataLoader worker processes per rank when there is a GPU


def add_run_arguments(parser, output_dir):
    """The options pretraining and fine-tuning share: output, length, backend, seed, checkpoints, logging, launcher.
    --num_workers is left None for `default_workers` to settle once the device is known."""
    parser.add_argument("--output_dir", default=output_dir)
    parser.add_argument("--max_steps", type=int, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--backend", choices=("torch", "sdpa", "triton"),
                        help="op backend (default: triton on a GPU, torch on the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_resume", dest="resume", action="store_false",
                        help="start fresh even if output_dir holds a checkpoint (default: resume from the latest)")
    parser.add_argument("--log_interval", type=int, default=10, help="optimizer steps per metrics line")
    parser.add_argument("--save_interval", type=int, default=1000, help="optimizer steps between checkpoints")
    parser.add_argument("--keep_last", type=int, default=2, help="checkpoints kept in output_dir")
    parser.add_argument("--num_workers", type=int,
                        help=f"DataLoader worker processes per rank (default: {GPU_WORKERS} with a GPU, 0 on the CPU)")
    parser.add_argument("--log_samples", action="store_true",
                        help="write the dataset indices of every step to output_dir/samples_rank<r>.jsonl")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    deepspeed.add_config_arguments(parser)


def check_run_arguments(args, cpu_config="train/ds_cpu.json"):
    """UsageError for a bad value of the options add_run_arguments added; returns args."""
    for name in ("log_interval", "save_interval", "keep_last"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.num_workers is not None and args.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0, got {args.num_workers}")
    if not args.deepspeed_config:
        raise UsageError(f"--deepspeed_config is required (train/ds.json on GPUs, {cpu_config} on a CPU)")
    return args


def default_workers(args, on_gpu):
    """Fills in --num_workers. On the CPU the loader runs in the training process: worker processes would take cores
    from the compute threads (2 workers cut the demo's samples/s from 450 to 336 on 2 cores)."""
    if args.num_workers is None:
        args.num_workers = GPU_WORKERS if on_gpu else 0


def load_ds_config(path, world_size, on_gpu):
    """Read and check the DeepSpeed JSON; returns the dict to pass to deepspeed.initialize and a note for the log."""
    if not os.path.isfile(path):
        raise UsageError(f"--deepspeed_config {path!r} does not exist")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise UsageError(f"{path}: {key} must be a positive integer, got {config.get(key)!r}")
    global_batch, micro = config["train_batch_size"], config["train_micro_batch_size_per_gpu"]
    if global_batch % (micro * world_size):
        raise UsageError(f"{path}: train_batch_size {global_batch} is not divisible by train_micro_batch_size_per_gpu "
                         f"{micro} x world size {world_size}")
    accumulation = global_batch // (micro * world_size)
    if config.get("gradient_accumulation_steps", accumulation) != accumulation:
        raise UsageError(f"{path}: gradient_accumulation_steps {config['gradient_accumulation_steps']} != "
                         f"train_batch_size / (micro batch x world size) = {accumulation}; leave it out")
    fp16, bf16 = (config.get(k, {}).get("enabled", False) for k in ("fp16", "bf16"))
    if fp16 and bf16:
        raise UsageError(f"{path}: fp16 and bf16 are both enabled; enable one")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UsageError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    note = f"GPU, {'bf16' if bf16 else 'fp16' if fp16 else 'fp32'}"
    if not on_gpu:
        if fp16:
            raise UsageError(f"{path}: fp16 needs a GPU (no GPU found); use train/ds_cpu.json (fp32) or bf16")
        note = "no GPU found: running on the CPU with gloo in fp32"
        if bf16:
            config["bf16"]["enabled"] = False
            note += f" ({path} asks for bf16: turned off on the CPU)"
        # DeepSpeed's fused Adam would be JIT-built for the CPU; torch's AdamW is the same maths.
        config.get("optimizer", {}).setdefault("params", {})["torch_adam"] = True
    return config, note


def fill_output_paths(config, output_dir):
    """Monitors (TensorBoard, CSV, W&B) enabled in the JSON without an output_path write into output_dir."""
    for monitor in ("tensorboard", "csv_monitor"):
        if config.get(monitor, {}).get("enabled"):
            config[monitor].setdefault("output_path", os.path.join(output_dir, monitor))


def fill_schedule(config, total_steps):
    """WarmupDecayLR without step counts in the JSON decays over this run: total = the run, warmup = 10% of it."""
    scheduler = config.get("scheduler")
    if scheduler and scheduler.get("type") == "WarmupDecayLR":
        params = scheduler.setdefault("params", {})
        params.setdefault("total_num_steps", total_steps)
        params.setdefault("warmup_num_steps", max(1, round(0.1 * params["total_num_steps"])))


def build_config(name, vocab_size):
    """A preset (its vocab sized to the tokenizer) or a config JSON (whose vocab must cover the tokenizer's)."""
    if name.endswith(".json") or os.path.sep in name:
        if not os.path.isfile(name):
            raise UsageError(f"--model {name!r}: config file does not exist")
        config = ViLBERTConfig.from_json(name)
        if config.vocab_size < vocab_size:
            raise UsageError(f"--model {name}: vocab_size {config.vocab_size} < the tokenizer's {vocab_size}")
        return config
    try:
        return ViLBERTConfig.preset(name, vocab_size=vocab_size)
    except ValueError as e:
        raise UsageError(f"--model: {e} (or give a config JSON path)") from None


def param_groups(model, weight_decay):
    """AdamW groups as the paper: no weight decay on biases and LayerNorm weights (the 1-d parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, output_dir, client_state, keep_last):
    """Save on every rank; point `latest` at the new tag only once every rank has finished writing it.

    DeepSpeed's own `latest` is written by rank 0 without waiting for the other ranks' ZeRO shards and by truncating
    the file in place, so a crash mid-save could leave it pointing at a partial checkpoint (or empty). Here the tag
    dir is complete (barrier) before `latest` is replaced atomically, and older tags are deleted only after that.
    """
    client_state["rng"] = gather_objects(rng_state())
    tag = f"global_step{client_state['step']}"
    engine.save_checkpoint(output_dir, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = os.path.join(output_dir, f"latest.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(output_dir, "latest"))
        old = sorted((d for d in os.listdir(output_dir) if d.startswith("global_step") and d != tag),
                     key=lambda d: int(d[len("global_step"):]))
        for d in old[:max(0, len(old) - (keep_last - 1))]:
            shutil.rmtree(os.path.join(output_dir, d), ignore_errors=True)
    dist.barrier()
    return tag


def check_world_size(output_dir, world_size):
    """ZeRO checkpoints are sharded per rank: resuming at another world size needs DeepSpeed's universal format."""
    with open(os.path.join(output_dir, "latest")) as f:
        tag = f.read().strip()
    shards = glob.glob(os.path.join(output_dir, tag, "*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    if shards and len(shards) != world_size:
        raise SystemExit(f"{PROGRAM}: error: {output_dir}/{tag} was saved by {len(shards)} ranks, this run has "
                         f"{world_size}: use the same world size (or convert it with ds_to_universal and set "
                         f'"checkpoint": {{"load_universal": true}}), or pass --no_resume')


def resume_latest(engine, output_dir, world_size, rank):
    """Loads the newest checkpoint in output_dir into the engine and restores this rank's RNG states; returns
    (optimizer step, epoch, samples consumed in that epoch), or (0, 0, 0) when output_dir holds none."""
    if not os.path.isfile(os.path.join(output_dir, "latest")):
        return 0, 0, 0
    check_world_size(output_dir, world_size)
    load_path, client_state = engine.load_checkpoint(output_dir)
    if load_path is None:
        raise RuntimeError(f"could not load the checkpoint named by {output_dir}/latest")
    step, epoch, consumed = client_state["step"], client_state["epoch"], client_state["consumed_samples"]
    if len(client_state["rng"]) == world_size:
        set_rng_state(client_state["rng"][rank])
    if rank == 0:
        print(f"{PROGRAM}: resumed from {load_path} at step {step}, epoch {epoch}, sample {consumed}", flush=True)
    return step, epoch, consumed


def gather_objects(obj):
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def train_flops(config, text_lens, image_lens, num_mlm_targets, num_region_targets, architecture="two-stream"):
    """Analytic training FLOPs of one micro batch: 6 per multiply-add of every matmul (2 forward, 4 backward).

    Counted from the config per real (unpadded) token and region: each layer's projections and FFN (the weights a
    position touches) and its attention matmuls (scores and context: 2 x length x width per query); the image
    embedding; the MLM and region heads on their targets only (as the model computes them).
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


def peak_memory_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux reports KiB)


class IndexedDataset(torch.utils.data.Dataset):
    """Yields (index, sample) so each batch carries the dataset indices it was made from."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


class IndexedCollator:
    def __init__(self):
        self.collator = PretrainCollator()

    def __call__(self, items):
        return [i for i, _ in items], self.collator([s for _, s in items])


def ignore_stop_signals(_worker_id):
    # DataLoader workers must outlive a SIGTERM to the process tree until the rank has saved its checkpoint.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def gpu_available():
    return get_accelerator().device_name() != "cpu"


def main(argv=None):
    # `python train/pretrain.py` without the launcher: a world of one.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
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
    args.backend = args.backend or ("triton" if on_gpu else "torch")
    default_workers(args, on_gpu)

    deepspeed.init_distributed()
    if on_gpu:
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    if rank == 0:
        print(f"pretrain.py: {device_note}, {world_size} rank(s), backend {args.backend}, {args.architecture}",
              flush=True)
    stop = {"signal": None}  # set by SIGTERM/SIGINT on this rank; all ranks act on it at the next step boundary

    def request_stop(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    if args.data is None and int(os.environ["LOCAL_RANK"]) == 0:
        ensure_default_data()  # one writer per node; the others wait at the barrier
    dist.barrier()
    data_path = args.data or ensure_default_data()

    dataset = PretrainDataset(open_store(data_path), tokenizer, seed=args.seed,
                              drop_masked_loss_on_negatives=args.drop_masked_loss_on_negatives)
    global_batch = ds_config["train_batch_size"]
    micro = ds_config["train_micro_batch_size_per_gpu"]
    accumulation = global_batch // (micro * world_size)
    micro_steps_per_epoch = len(dataset) // (micro * world_size)
    max_steps = args.max_steps or max(1, int(args.epochs * micro_steps_per_epoch) // accumulation)
    fill_schedule(ds_config, max_steps)
    fill_output_paths(ds_config, args.output_dir)

    # Same initial weights on every rank (DeepSpeed also broadcasts rank 0's), then per-rank dropout streams.
    torch.manual_seed(args.seed)
    model_class = ARCHITECTURES[args.architecture]
    model = model_class(config, backend=args.backend)
    if args.init_bert:
        model.load_bert(args.init_bert)
    weight_decay = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    args.deepspeed_config = None  # the checked dict is passed instead (initialize refuses both)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, config=ds_config,
                                           model_parameters=param_groups(model, weight_decay))
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    os.makedirs(args.output_dir, exist_ok=True)
    # optimizer steps; epoch; global samples consumed in this epoch
    step, epoch, consumed = resume_latest(engine, args.output_dir, world_size, rank) if args.resume else (0, 0, 0)

    mode = "a" if step else "w"  # a resumed run continues the logs; a fresh one replaces them
    metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), mode) if rank == 0 else None
    samples_file = (open(os.path.join(args.output_dir, f"samples_rank{rank}.jsonl"), mode)
                    if args.log_samples else None)
    progress = tqdm(total=max_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    device = engine.device
    input_dtype = (torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled()
                   else torch.float32)
    # Sums over the log window, kept on the device so that logging costs one reduction per window (one row per
    # micro step): the losses, MLM correct and target counts, alignment correct, samples, FLOPs, micro steps.
    sums = torch.zeros(len(METRIC_NAMES) + 6, dtype=torch.float64, device=device)
    window_start = time.perf_counter()
    step_indices = []
    stopping = False  # agreed by all ranks
    while step < max_steps and not stopping:
        dataset.set_epoch(epoch)
        sampler = ResumableSampler(len(dataset), seed=args.seed, rank=rank, world_size=world_size,
                                   micro_batch_size=micro)
        sampler.load_state_dict({"epoch": epoch, "consumed_samples": consumed})
        # The loader's own generator: starting an iterator must not draw from the global RNG (dropout's), or a
        # resumed run, which starts one mid-epoch, would drop out other units than the uninterrupted run.
        loader = DataLoader(IndexedDataset(dataset), batch_sampler=sampler, collate_fn=IndexedCollator(),
                            num_workers=args.num_workers, pin_memory=on_gpu, worker_init_fn=ignore_stop_signals,
                            generator=torch.Generator().manual_seed(args.seed + epoch))
        for indices, batch in loader:
            flops = train_flops(config, batch["text_lens"], batch["image_lens"],
                                int((batch["mlm_labels"] != IGNORE_INDEX).sum()), int(batch["region_mask"].sum()),
                                args.architecture)
            batch = {k: t.to(device, non_blocking=True) for k, t in batch.items()}
            for key in ("image_features", "image_locations"):  # the model's inputs in its dtype (bf16 on GPUs)
                batch[key] = batch[key].to(input_dtype)
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            consumed += micro * world_size
            step_indices.extend(indices)
            with torch.no_grad():
                masked = batch["mlm_labels"] != IGNORE_INDEX
                # mlm_logits has one row per MLM target, in row-major (b, t) order.
                mlm_correct = (out.mlm_logits.argmax(-1) == batch["mlm_labels"][masked]).sum()
                align_correct = (out.align_logits.argmax(-1) == batch["is_aligned"]).sum()
                counts = torch.tensor([len(indices), flops, 1.0], dtype=torch.float64, device=device)
                sums += torch.cat([torch.stack([*(getattr(out, n).detach().double() for n in METRIC_NAMES),
                                                mlm_correct.double(), masked.sum().double(),
                                                align_correct.double()]), counts])
            if engine.global_steps == step:
                continue  # still accumulating gradients
            step = engine.global_steps
            progress.update(1)
            if samples_file:
                samples_file.write(json.dumps({"step": step, "indices": step_indices}) + "\n")
                samples_file.flush()
            step_indices = []
            if step % args.log_interval == 0 or step == max_steps:
                dist.all_reduce(sums)
                elapsed = time.perf_counter() - window_start
                *loss_sums, mlm_correct, mlm_count, align_correct, samples, flops, micro_steps = sums.tolist()
                record = {"step": step, "samples": step * global_batch, "epoch": epoch, "lr": engine.get_lr()[0],
                          **{name: value / micro_steps for name, value in zip(METRIC_NAMES, loss_sums)},
                          "mlm_acc": mlm_correct / max(mlm_count, 1), "align_acc": align_correct / samples,
                          "samples_per_s": samples / elapsed, "tflops": flops / elapsed / 1e12,
                          "max_mem_mb": peak_memory_mb()}
                if rank == 0:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    progress.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.1f}")
                    if engine.monitor.enabled:
                        engine.monitor.write_events([(f"Train/{k}", v, record["samples"]) for k, v in record.items()
                                                     if k not in ("step", "samples")])
                sums.zero_()
                window_start = time.perf_counter()
            # Every rank must stop at the same step, or the next collective hangs: a signal on any rank counts.
            flag = torch.tensor(float(stop["signal"] is not None), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopping = bool(flag.item())
            if step % args.save_interval == 0 or step >= max_steps or stopping:
                save_checkpoint(engine, args.output_dir, {"step": step, "epoch": epoch, "consumed_samples": consumed,
                                                          "world_size": world_size}, args.keep_last)
            if step >= max_steps or stopping:
                break
        else:  # the epoch ran out: the next one starts from its first sample
            epoch, consumed = epoch + 1, 0
    progress.close()

    if stopping and step < max_steps:
        if rank == 0:
            print(f"pretrain.py: stopped by {stop['signal'] or 'a signal on another rank'} at step {step}; "
                  "checkpoint saved, rerun to resume")
        return 0
    if rank == 0:
        # The fp32 master weights from the ZeRO checkpoint just written: consolidated for every ZeRO stage.
        final = os.path.join(args.output_dir, "final")
        if ds_config.get("zero_optimization", {}).get("stage", 0):
            state = get_fp32_state_dict_from_zero_checkpoint(args.output_dir, tag=f"global_step{step}")
        else:
            state = {name: t.float() for name, t in engine.module.state_dict().items()}
        export = model_class(config, backend="torch")
        export.load_state_dict(state)
        export.save_pretrained(final)
        print(f"pretrain.py: done, {step} steps; weights in {final}")
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
