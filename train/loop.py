"""The DeepSpeed training loop that train/pretrain.py and train/finetune.py share, and its plumbing.

A script parses its own arguments plus `add_run_arguments`, checks them and the JSON (`load_ds_config`) before any
collective, builds its model and dataset, then hands them to `train` with two functions of its own:

    micro_step(engine, batch) -> (loss, device_sums, host_sums)
        the forward pass of one micro batch, and what the loop adds up over a log window: device_sums, a float64
        device vector (losses, hit counts, ...), and host_sums, floats known on the host (sample counts, FLOPs), kept
        apart so that no micro step copies to the device (a copy from pageable memory waits for the GPU)
    summarize(sums, micro_steps, seconds) -> {}
        the script's metrics for the window from the sums of all ranks, device_sums then host_sums (with "loss",
        which the progress bar shows)

`train` owns what must be the same for every job: the schedule over the run, per-rank RNG streams, the resumable
sampler (one DataLoader for the whole run: the epoch travels with each index), checkpoints (every --save_interval
steps, at the end, and on SIGTERM/SIGINT, with `latest` replaced only once every rank has written), resuming at the
next unseen sample, metrics.jsonl and the progress bar.
"""
import contextlib
import glob
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import time

import deepspeed
import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.lr_schedules import WarmupLR
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from torch.utils.data import DataLoader
from tqdm import tqdm

from vilbert import ViLBERTConfig
from vilbert.config import BACKENDS
from vilbert.data import ResumableSampler

# The running script ("pretrain.py" or "finetune.py"), for messages.
PROGRAM = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else "train"
MAX_GPU_WORKERS = 8  # DataLoader worker processes per rank with a GPU, at most (the cores allowing)


class UsageError(Exception):
    """A bad argument or config, found before any collective: printed as one line, exit status 2."""


# ---- arguments and config, checked before any rank waits on another ------------------------------------------------
def add_run_arguments(parser, output_dir):
    """The options every training script shares: output, length, backend, seed, checkpoints, logging, launcher.
    --num_workers is left None for `default_workers` to settle once the device is known."""
    parser.add_argument("--output_dir", default=output_dir)
    parser.add_argument("--max_steps", type=int, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--backend", choices=BACKENDS,
                        help="op backend (default: triton on a GPU, torch on the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_resume", dest="resume", action="store_false",
                        help="start fresh even if output_dir holds a checkpoint, moving the earlier run's checkpoints "
                             "and logs to output_dir/previous_runs/ (default: resume from the latest)")
    parser.add_argument("--log_interval", type=int, default=10, help="optimizer steps per metrics line")
    parser.add_argument("--save_interval", type=int, default=1000, help="optimizer steps between checkpoints")
    parser.add_argument("--keep_last", type=int, default=2, help="checkpoints kept in output_dir")
    parser.add_argument("--num_workers", type=int,
                        help="DataLoader worker processes per rank (default: with a GPU, the rank's share of the "
                             f"cores less one, 1 to {MAX_GPU_WORKERS}; 0 on the CPU)")
    parser.add_argument("--log_samples", action="store_true",
                        help="write the dataset indices of every step to output_dir/samples_rank<r>.jsonl")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    deepspeed.add_config_arguments(parser)


def check_run_arguments(args, cpu_config):
    """UsageError for a bad value of the options add_run_arguments added; returns args."""
    for name in ("log_interval", "save_interval", "keep_last"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.max_steps is None and not args.epochs > 0:
        raise UsageError(f"--epochs must be > 0, got {args.epochs}")
    if not 0 <= args.seed < 2 ** 32 - 1:  # numpy's seeds; rank r seeds with seed + r
        raise UsageError(f"--seed must be in [0, 2**32 - 1), got {args.seed}")
    if args.num_workers is not None and args.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0, got {args.num_workers}")
    if not args.deepspeed_config:
        raise UsageError(f"--deepspeed_config is required (train/ds.json on GPUs, {cpu_config} on a CPU)")
    return args


def gpu_available():
    return get_accelerator().device_name() != "cpu"


def world_from_env(master_port):
    """(rank, world size) from the launcher's environment; without the launcher, a world of one."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(master_port))):
        os.environ.setdefault(key, value)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def default_workers(args, on_gpu):
    """Fills in --num_workers. With a GPU: this rank's share of the machine's cores, less one for the training
    process itself (one loader process decodes and masks ~1900 samples/s of the built-in data, fewer than a GPU
    trains). On the CPU the loader runs in the training process: worker processes would take cores from the compute
    threads (2 workers cut the demo's samples/s from 450 to 336 on 2 cores)."""
    if args.num_workers is None and not on_gpu:
        args.num_workers = 0
    elif args.num_workers is None:
        ranks_here = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)  # deepspeed, torchrun
        cores = len(os.sched_getaffinity(0))
        args.num_workers = min(MAX_GPU_WORKERS, max(1, cores // ranks_here - 1))


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
    if (fp16 or bf16) and stage == 0 and on_gpu:  # (the CPU runs fp32)
        raise UsageError(f"{path}: {'fp16' if fp16 else 'bf16'} needs zero_optimization.stage >= 1 here: the final "
                         "export reads the fp32 master weights from the ZeRO checkpoint (stage 0 saves only the "
                         f"{'fp16' if fp16 else 'bf16'} model)")
    if not isinstance(config.get("optimizer"), dict) or "type" not in config["optimizer"]:
        raise UsageError(f'{path}: needs an "optimizer" block with a "type" (the training scripts build the weight '
                         "decay groups for it)")
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


def init_distributed(on_gpu):
    """The process group (NCCL on GPUs, gloo on the CPU) and this rank's GPU."""
    deepspeed.init_distributed()
    if on_gpu:
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    else:
        release_cpu_allreduce_buffer()


def release_cpu_allreduce_buffer():
    """On the CPU with every rank on one machine, DeepSpeed's all-reduce maps one shared-memory segment per rank
    (66 MB, in /dev/shm, that is RAM) named after the master address and port, and never unlinks it: each run on a
    new port would leave its segments behind until reboot (seen here: 21 GB of 24 after a few hundred test runs).
    Once every rank has mapped every segment (init_distributed returned everywhere), the names can go; the mappings
    last until the process ends, however it ends."""
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def fill_output_paths(config, output_dir):
    """The TensorBoard and CSV monitors, when enabled in the JSON without an output_path, write into output_dir."""
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


# ---- checkpoints ----------------------------------------------------------------------------------------------------
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


def gather_objects(obj):
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


_TAG = re.compile(r"global_step(\d+)")  # this loop's checkpoint folders (not e.g. ds_to_universal's *_universal)


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
        old = sorted((d for d in os.listdir(output_dir) if _TAG.fullmatch(d) and d != tag),
                     key=lambda d: int(_TAG.fullmatch(d)[1]))
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
                         f"{world_size}: resume it with the same world size, or pass --no_resume to start over")


def resume_latest(engine, output_dir, world_size, rank, sampler, train_batch_size):
    """Loads the newest checkpoint in output_dir into the engine and the sampler (which refuses a position saved with
    another seed, dataset size or batch: it would name other samples) and restores this rank's RNG states; returns
    the optimizer step, 0 when output_dir holds no checkpoint. Another world size or train_batch_size is refused: the
    RNG states are per rank, and the step counts samples in global batches."""
    if not os.path.isfile(os.path.join(output_dir, "latest")):
        return 0
    check_world_size(output_dir, world_size)
    load_path, client_state = engine.load_checkpoint(output_dir)
    if load_path is None:
        raise RuntimeError(f"could not load the checkpoint named by {output_dir}/latest")
    if "sampler" not in client_state:
        raise SystemExit(f"{PROGRAM}: error: {load_path} was saved by an earlier version of this loop (no sampler "
                         "state); pass --no_resume to start over")
    saved = {"world_size": len(client_state["rng"]),  # one RNG state per rank
             "train_batch_size": client_state.get("train_batch_size", train_batch_size)}
    this_run = {"world_size": world_size, "train_batch_size": train_batch_size}
    if saved != this_run:
        raise SystemExit(f"{PROGRAM}: error: {load_path} was saved with {saved}, this run has {this_run}: resume it "
                         "with the same, or pass --no_resume to start over")
    try:
        sampler.load_state_dict(client_state["sampler"])
    except ValueError as error:
        raise SystemExit(f"{PROGRAM}: error: cannot resume {load_path}: {error}; run it with the saved run's --seed, "
                         "data and batch sizes, or pass --no_resume to start over") from None
    set_rng_state(client_state["rng"][rank])
    if rank == 0:
        print(f"{PROGRAM}: resumed from {load_path} at step {client_state['step']}, epoch {sampler.epoch}, "
              f"sample {sampler.consumed_samples}", flush=True)
    return client_state["step"]


def set_aside_previous_run(output_dir):
    """For --no_resume: moves an earlier run's checkpoints, `latest`, final/ and logs from output_dir into
    output_dir/previous_runs/<time>/, so that nothing of it is resumed, mixed into this run's checkpoint folders or
    deleted. Returns that folder, or None when there was nothing to move."""
    return _set_aside(output_dir, [name for name in os.listdir(output_dir)
                                   if _TAG.fullmatch(name) or name in ("latest", "final", "metrics.jsonl")
                                   or re.fullmatch(r"samples_rank\d+\.jsonl", name)])


def set_aside_unfinished_saves(output_dir):
    """Before resuming: moves checkpoint folders numbered past the one `latest` names (all of them when there is no
    `latest`) into output_dir/previous_runs/<time>/. A save cut short (a hard kill, a lost node) leaves one; this run
    would otherwise write its own save into it, or keep it among the last --keep_last and delete a complete one.
    Returns that folder, or None when there was nothing to move."""
    latest = os.path.join(output_dir, "latest")
    resumed = -1
    if os.path.isfile(latest):
        with open(latest) as f:
            match = _TAG.fullmatch(f.read().strip())
        if not match:
            return None  # not ours to judge: resume_latest reports it
        resumed = int(match[1])
    return _set_aside(output_dir, [name for name in os.listdir(output_dir)
                                   if _TAG.fullmatch(name) and int(_TAG.fullmatch(name)[1]) > resumed])


def _set_aside(output_dir, names):
    if not names:
        return None
    os.makedirs(os.path.join(output_dir, "previous_runs"), exist_ok=True)
    folder = tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=os.path.join(output_dir, "previous_runs"))
    for name in names:
        os.replace(os.path.join(output_dir, name), os.path.join(folder, name))
    return folder


def fp32_weights(engine, output_dir):
    """The fp32 master weights of the checkpoint `train` wrote at its last step, consolidated from the ZeRO shards
    for every stage (rank 0 reads them all)."""
    if engine.zero_optimization_stage():
        return get_fp32_state_dict_from_zero_checkpoint(output_dir, tag=f"global_step{engine.global_steps}")
    return {name: t.float() for name, t in engine.module.state_dict().items()}


# ---- the loop -------------------------------------------------------------------------------------------------------
class EpochBatches:
    """This rank's micro batches from the sampler's position on, epoch after epoch, each a list of (epoch, index): the
    epoch travels with the indices, so one DataLoader and its worker processes serve the whole run (no restart and
    refill at every epoch boundary)."""

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def __iter__(self):
        while True:  # the sampler moves to its next epoch after each pass
            for batch in self.sampler:
                yield [(self.sampler.epoch, i) for i in batch]


class EpochIndexedDataset(torch.utils.data.Dataset):
    """(epoch, index) -> (epoch, index, sample `index` of that epoch)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, index = item
        if hasattr(self.dataset, "set_epoch"):  # pretraining masks and retrieval negatives are drawn per epoch
            self.dataset.set_epoch(epoch)
        return epoch, index, self.dataset[index]


class IndexedCollator:
    """(epoch, dataset indices, collator(samples)) for a list of EpochIndexedDataset items of one epoch."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items):
        return items[0][0], [index for _, index, _ in items], self.collator([sample for _, _, sample in items])


def ignore_stop_signals(_worker_id):
    # DataLoader workers must outlive a SIGTERM to the process tree until the rank has saved its checkpoint.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def stop_requests():
    """Inside the block SIGTERM/SIGINT set stop["signal"] instead of ending the process; the old handlers come back."""
    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def peak_memory_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux reports KiB)


def timed(iterable, waited):
    """Yields the items of `iterable`, adding the seconds spent waiting for each to waited[0]."""
    iterator = iter(iterable)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - start
        yield item


class MetricsWindow:
    """The sums behind one metrics.jsonl line. micro_step's device sums stay on the device and its host sums, with
    the loop's counts (samples, micro steps, seconds spent waiting for the loader), on the host: one copy and one
    reduction per window, not per step."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.device_sums = self.host_sums = None
        self.start = time.perf_counter()

    def add(self, on_device, on_host, samples, waited):
        on_device, on_host = on_device.detach().double(), [*on_host, samples, 1.0, waited]
        self.device_sums = on_device if self.device_sums is None else self.device_sums + on_device
        self.host_sums = on_host if self.host_sums is None else [a + b for a, b in zip(self.host_sums, on_host)]

    def pause(self, since):
        """Leaves the seconds since `since` out of the window (samples/s counts training, not saving)."""
        self.start += time.perf_counter() - since

    def close(self, summarize, world_size):
        """Reduces the window over the ranks and starts the next; returns summarize's fields, samples_per_s and
        data_wait."""
        sums = torch.cat([self.device_sums,
                          torch.tensor(self.host_sums, dtype=torch.float64, device=self.device_sums.device)])
        dist.all_reduce(sums)
        seconds = time.perf_counter() - self.start
        *task_sums, samples, micro_steps, wait_seconds = sums.tolist()
        self.reset()
        return {**summarize(task_sums, micro_steps, seconds), "samples_per_s": samples / seconds,
                "data_wait": wait_seconds / world_size / seconds}


def make_loader(dataset, collator, sampler, args, on_gpu, epoch):
    """A DataLoader over `sampler`'s batches that yields (epoch, indices, batch). It has its own generator: starting
    an iterator must not draw from the global RNG (dropout's), or a resumed run would drop out other units than the
    uninterrupted run."""
    return DataLoader(EpochIndexedDataset(dataset), batch_sampler=EpochBatches(sampler),
                      collate_fn=IndexedCollator(collator), num_workers=args.num_workers, pin_memory=on_gpu,
                      worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(args.seed + epoch))


def train(args, model, dataset, collator, ds_config, micro_step, summarize):
    """Trains `model` on `dataset` with DeepSpeed for --max_steps optimizer steps (or --epochs); returns
    (engine, finished). finished is False when SIGTERM/SIGINT on some rank stopped the run early: every rank saved a
    checkpoint, and running the same command again resumes it.

    Every metrics.jsonl line holds step, samples (global), epoch, lr, then summarize's fields for the window, then
    samples_per_s (all ranks), data_wait (the share of the window the ranks spent waiting for batches, their mean:
    near 0 when the loader keeps up; with --num_workers 0, the share spent loading) and max_mem_mb (rank 0).
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    global_batch, micro = ds_config["train_batch_size"], ds_config["train_micro_batch_size_per_gpu"]
    accumulation = global_batch // (micro * world_size)
    max_steps = args.max_steps or max(1, int(args.epochs * (len(dataset) // (micro * world_size))) // accumulation)
    fill_schedule(ds_config, max_steps)
    fill_output_paths(ds_config, args.output_dir)
    weight_decay = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    args.deepspeed_config = None  # the checked dict is passed instead (initialize refuses both)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, config=ds_config,
                                           model_parameters=param_groups(model, weight_decay))
    # The same initial weights on every rank (the caller seeded them; DeepSpeed broadcasts rank 0's), then per-rank
    # dropout streams.
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    os.makedirs(args.output_dir, exist_ok=True)
    if rank == 0:
        if args.resume:
            moved, what = set_aside_unfinished_saves(args.output_dir), "checkpoint folders past `latest` (cut short)"
        else:
            moved, what = set_aside_previous_run(args.output_dir), "--no_resume: the earlier run's checkpoints and logs"
        if moved:
            print(f"{PROGRAM}: {what} moved to {moved}", flush=True)
    dist.barrier()
    sampler = ResumableSampler(len(dataset), seed=args.seed, rank=rank, world_size=world_size, micro_batch_size=micro)
    step = resume_latest(engine, args.output_dir, world_size, rank, sampler, global_batch) if args.resume else 0
    if step == 0 and isinstance(engine.lr_scheduler, WarmupLR):
        # DeepSpeed's WarmupLR and WarmupDecayLR set iteration -1's lr when built and step after every optimizer step,
        # and both iterations -1 and 0 give the minimum lr (0 in our configs). One step here makes optimizer step k use
        # iteration k - 1, as the official schedule (LambdaLR): one step at lr 0, not two, and the last step at
        # 1 / (total - warmup) of peak.
        engine.lr_scheduler.step()
    # The position as the loop sees it (the loader's workers run ahead of it): epoch; global samples consumed in it.
    epoch, consumed = sampler.epoch, sampler.consumed_samples

    mode = "a" if step else "w"  # a resumed run continues the logs; a fresh one replaces them
    metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), mode) if rank == 0 else None
    samples_file = (open(os.path.join(args.output_dir, f"samples_rank{rank}.jsonl"), mode)
                    if args.log_samples else None)
    progress = tqdm(total=max_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    on_gpu = engine.device.type != "cpu"
    window = MetricsWindow()
    waited = [0.0]  # seconds spent waiting for the loader since the last micro step
    step_indices = []
    stopping = False  # agreed by all ranks
    loader = make_loader(dataset, collator, sampler, args, on_gpu, epoch)
    batches = timed(loader, waited) if step < max_steps else ()  # () when resuming a run that had finished
    with stop_requests() as stop:
        for batch_epoch, indices, batch in batches:
            if batch_epoch != epoch:  # the previous epoch ran out: this is the first batch of the next
                epoch, consumed = batch_epoch, 0
            loss, on_device, on_host = micro_step(engine, batch)
            engine.backward(loss)
            lr = engine.get_lr()[0]  # the lr this optimizer step applies (the scheduler moves on in engine.step)
            engine.step()
            consumed += micro * world_size
            step_indices.extend(indices)
            window.add(on_device, on_host, len(indices), waited[0])
            waited[0] = 0.0
            if engine.global_steps == step:
                continue  # still accumulating gradients
            step = engine.global_steps
            progress.update(1)
            if samples_file:
                samples_file.write(json.dumps({"step": step, "indices": step_indices}) + "\n")
                samples_file.flush()
            step_indices = []
            # Every rank must stop at the same step, or the next collective hangs: a signal on any rank counts.
            flag = torch.tensor(float(stop["signal"] is not None), device=engine.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopping = bool(flag.item())
            # On a stop, the steps since the last line get a line of their own (a resumed run starts a new window).
            if step % args.log_interval == 0 or step == max_steps or stopping:
                record = {"step": step, "samples": step * global_batch, "epoch": epoch, "lr": lr,
                          **window.close(summarize, world_size), "max_mem_mb": peak_memory_mb()}
                if rank == 0:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    progress.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.1f}")
                    if engine.monitor.enabled:
                        engine.monitor.write_events([(f"Train/{k}", v, record["samples"])
                                                     for k, v in record.items() if k not in ("step", "samples")])
            if step % args.save_interval == 0 or step >= max_steps or stopping:
                saving_since = time.perf_counter()
                position = {**sampler.state_dict(), "epoch": epoch, "consumed_samples": consumed}
                client_state = {"step": step, "sampler": position, "train_batch_size": global_batch}
                save_checkpoint(engine, args.output_dir, client_state, args.keep_last)
                window.pause(saving_since)
            if step >= max_steps or stopping:
                break
    del batches  # the DataLoader iterator, and with it the worker processes, ends here
    progress.close()
    for f in (metrics_file, samples_file):
        if f is not None:
            f.close()

    finished = step >= max_steps
    if not finished and rank == 0:
        print(f"{PROGRAM}: stopped by {stop['signal'] or 'a signal on another rank'} at step {step}; "
              "checkpoint saved, rerun to resume", flush=True)
    return engine, finished
