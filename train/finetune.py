"""Fine-tune and evaluate ViLBERT on the paper's downstream tasks (VQA, image-text retrieval, referring expressions).

Launch (same conventions as train/pretrain.py: batch sizes in the DeepSpeed JSON are global):

    # built-in synthetic tasks (written on first use), from a pretraining run's weights, on a CPU:
    deepspeed --num_gpus 1 train/finetune.py --deepspeed_config train/ds_finetune_cpu.json \\
        --task vqa --init runs/pretrain/final --max_steps 300 --output_dir runs/vqa
    # the same budget from scratch (same config as the checkpoint, random weights):
    deepspeed --num_gpus 1 train/finetune.py --deepspeed_config train/ds_finetune_cpu.json \\
        --task vqa --init none --model runs/pretrain/final/config.json --max_steps 300 --output_dir runs/vqa_scratch
    # the single-stream baseline: from `pretrain.py --architecture single-stream` (the checkpoint says which it is),
    # or from scratch with --architecture single-stream:
    deepspeed --num_gpus 1 train/finetune.py --deepspeed_config train/ds_finetune_cpu.json \\
        --task vqa --init runs/pretrain_single/final --max_steps 300 --output_dir runs/vqa_single
    # real VQA 2.0 on GPUs (features: any store vilbert.data.open_store reads; bert-base-uncased's vocab.txt):
    deepspeed --num_gpus 8 train/finetune.py --deepspeed_config train/ds.json --task vqa --init runs/pretrain/final \\
        --data /data/vqa --train_split train2014 --val_split val2014 --features /data/coco_features.lmdb \\
        --vocab_file bert-base-uncased/vocab.txt --epochs 20
    # evaluation only (ours or an official checkpoint with its config):
    python train/finetune.py --deepspeed_config train/ds_finetune_cpu.json --task retrieval --eval_only \\
        --init runs/ret/final
    python train/finetune.py ... --task retrieval --eval_only --zero_shot --init runs/pretrain/final   # alignment head

--data is a directory holding, per split (--train_split / --val_split):
    vqa:       v2_OpenEnded_mscoco_<split>_questions.json + v2_mscoco_<split>_annotations.json
    retrieval: captions_<split>.jsonl ({"image_id", "caption"} per line), captions_<split>.jsonline
               (vilbert-multi-task's all_data_final_<split>.jsonline, renamed) or captions_<split>.json
               ({image_id: [...]}); hard_negative.pkl (vilbert-multi-task's) is used when there
    referring: refs_<split>.json or .jsonl ([{"ref_id", "image_id", "sentences", "bbox": [x, y, w, h]}])
and the feature store at <data>/features unless --features is given. Without --data: the built-in synthetic tasks.

A retrieval micro batch of N is N groups of NUM_CHOICES (4) pairs: 4N pairs per forward.

--architecture: a checkpoint of ours is two-stream (ViLBERT) or single-stream (the paper's baseline), told by its
weights; an --architecture that contradicts it is an error. Official checkpoints are two-stream; --init none builds
--architecture (default two-stream).

Stopping and resuming as train/pretrain.py: SIGTERM or SIGINT lets the current optimizer step finish, saves a
checkpoint on every rank and exits 0; running the same command again resumes from the newest complete checkpoint in
--output_dir at the next unseen sample, with the RNG states restored (same world size, seed, data and batch sizes;
--no_resume starts over, moving the earlier run's checkpoints and logs to output_dir/previous_runs/).

output_dir holds global_step<N>/ (DeepSpeed checkpoints, every --save_interval steps and at the end; the last
--keep_last kept), `latest`, metrics.jsonl (one line per log step: step, samples, epoch, lr, loss, train_metric (the
task's training metric, see task_hits), samples_per_s, data_wait, max_mem_mb; then one "eval" line), final/
(`save_pretrained` of the task model's fp32 weights; for VQA also answers.json, the answer vocabulary). Evaluation runs
on rank 0 over the whole val split: VQA accuracy, R@1/5/10 both ways, referring accuracy at IoU 0.5. ZeRO-3 is not
supported here (ZeRO 0-2 are).
"""
import argparse
import functools
import json
import os
import sys
import time

import torch
from torch.utils.data import DataLoader

try:
    import deepspeed.comm as dist
except ModuleNotFoundError as error:  # `pip install -e .` leaves DeepSpeed out: the train extra brings it
    sys.exit(f"{os.path.basename(__file__)}: error: {error}; install the train extra: pip install -e '.[train]'")
from deepspeed.accelerator import get_accelerator  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loop import (UsageError, add_run_arguments, build_config, check_run_arguments, default_workers,  # noqa: E402
                  fp32_weights, gpu_available, init_distributed, load_ds_config, train, world_from_env)

from vilbert.checkpoint import is_pretrained_dir  # noqa: E402
from vilbert.config import default_backend  # noqa: E402
from vilbert.data import load_tokenizer, open_store  # noqa: E402
from vilbert.tasks.common import TaskCollator, model_inputs  # noqa: E402
from vilbert.tasks.metrics import retrieval_recall, summarize_recall  # noqa: E402
from vilbert.tasks.models import (ARCHITECTURES, TASKS, alignment_score, evaluate_batches,  # noqa: E402
                                  load_pretraining_model, load_task_model, retrieval_score, task_hits)
from vilbert.tasks.referring import ReferringDataset, load_refs  # noqa: E402
from vilbert.tasks.retrieval import (JSON_LINES_SUFFIXES, NUM_CHOICES, RetrievalTrainDataset,  # noqa: E402
                                     load_captions, load_hard_negatives, retrieval_eval_set, score_all_pairs)
from vilbert.tasks.synthetic import FEATURES_DIR, ensure_synthetic_tasks  # noqa: E402
from vilbert.tasks.vqa import VQA2_NUM_ANSWERS, AnswerVocab, VQADataset, load_vqa  # noqa: E402

# The official downstream lengths (tokens including [CLS]/[SEP]); 100 regions + the IMG token for every task.
MAX_TEXT_LEN = {"vqa": 23, "retrieval": 30, "referring": 20}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--data", help="task directory (see the module docstring; default: built-in synthetic tasks)")
    parser.add_argument("--features", help="feature store (default: <data>/features)")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--val_split", default="val")
    parser.add_argument("--init", required=True,
                        help="checkpoint: a save_pretrained dir (pretraining or this task's), an official .bin (with "
                             "--model its config JSON), or 'none' to start from random weights")
    parser.add_argument("--model", default="small",
                        help="config preset or JSON for --init none or an official checkpoint (default: small)")
    parser.add_argument("--architecture", choices=ARCHITECTURES,
                        help="ViLBERT (two-stream) or the paper's single-stream baseline (default: what --init is; "
                             "two-stream for --init none and official checkpoints)")
    parser.add_argument("--vocab_file", help="BERT vocab.txt (default: the vocab shipped for the built-in data)")
    parser.add_argument("--answers", help="VQA answer vocabulary JSON list (default: --init's answers.json if it has "
                                           "one, else the top 3129 train answers)")
    parser.add_argument("--max_regions", type=int, default=100, help="regions per image (+ the IMG token)")
    parser.add_argument("--eval_only", action="store_true", help="evaluate --init on the val split, no training")
    parser.add_argument("--zero_shot", action="store_true",
                        help="retrieval: score pairs with the pretraining alignment head of --init "
                             "(implies --eval_only)")
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--hard_negatives",
                        help="retrieval training: each image's hard negatives, a .json file {image_id: [image_ids]} "
                             "or else vilbert-multi-task's hard_negative.pkl (a pickle: load only files you trust; "
                             "default: <data>/hard_negative.pkl if there, else the 4th choice takes a random image's "
                             "caption)")
    parser.add_argument("--max_eval_images", type=int,
                        help="retrieval: evaluate on the first N val images and their captions (default: all)")
    add_run_arguments(parser, output_dir="runs/finetune")
    args = check_run_arguments(parser.parse_args(argv), cpu_config="train/ds_finetune_cpu.json")
    args.init = None if args.init == "none" else args.init
    if args.zero_shot:
        if args.task != "retrieval":
            raise UsageError(f"--zero_shot is for --task retrieval, got --task {args.task}")
        args.eval_only = True
    if args.hard_negatives is not None:
        if args.task != "retrieval":
            raise UsageError(f"--hard_negatives is for --task retrieval, got --task {args.task}")
        if not os.path.isfile(args.hard_negatives):
            raise UsageError(f"--hard_negatives {args.hard_negatives!r} does not exist")
        if args.eval_only:
            raise UsageError("--hard_negatives is for training; --eval_only trains nothing")
    if args.eval_only and args.init is None:
        raise UsageError("--eval_only needs a checkpoint (--init DIR)")
    if args.init is not None and not os.path.exists(args.init):
        raise UsageError(f"--init {args.init!r} does not exist")
    for name in ("eval_batch_size", "max_regions"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def split_file(data_dir, stem, split, extensions):
    """<data>/<stem>_<split><ext> for the first extension that exists."""
    for ext in extensions:
        path = os.path.join(data_dir, f"{stem}_{split}{ext}")
        if os.path.isfile(path):
            return path
    raise UsageError(f"--data {data_dir!r}: no {stem}_{split}{'/'.join(extensions)}")


def build_datasets(args, data_dir, store, tokenizer):
    """(train dataset or None, val dataset or val retrieval set, answer vocabulary or None)."""
    text_len = MAX_TEXT_LEN[args.task]
    common = dict(max_text_len=text_len, max_regions=args.max_regions)
    if args.task == "vqa":
        def examples(split):
            questions = os.path.join(data_dir, f"v2_OpenEnded_mscoco_{split}_questions.json")
            annotations = os.path.join(data_dir, f"v2_mscoco_{split}_annotations.json")
            for path in (questions, annotations):
                if not os.path.isfile(path):
                    raise UsageError(f"--data {data_dir!r}: no {os.path.basename(path)}")
            return load_vqa(questions, annotations)
        train_examples = None if args.eval_only else examples(args.train_split)
        # A fine-tuned VQA checkpoint's head indexes the answers it was trained with: keep them when continuing it.
        if args.answers:
            vocab = AnswerVocab.load(args.answers)
        elif args.init and os.path.isfile(os.path.join(args.init, "answers.json")):
            vocab = AnswerVocab.load(os.path.join(args.init, "answers.json"))
        elif train_examples is not None:
            vocab = AnswerVocab.build(train_examples, VQA2_NUM_ANSWERS)
        else:
            raise UsageError("--eval_only for VQA needs the answer vocabulary: --answers or <init>/answers.json")
        train = None if train_examples is None else VQADataset(train_examples, store, tokenizer, vocab, **common)
        return train, VQADataset(examples(args.val_split), store, tokenizer, vocab, **common), vocab
    if args.task == "retrieval":
        def pairs(split):
            return load_captions(split_file(data_dir, "captions", split, (*JSON_LINES_SUFFIXES, ".json")))
        train = None
        if not args.eval_only:
            default_pool = os.path.join(data_dir, "hard_negative.pkl")
            pool_file = args.hard_negatives or (default_pool if os.path.isfile(default_pool) else None)
            pools = load_hard_negatives(pool_file) if pool_file else None
            train = RetrievalTrainDataset(pairs(args.train_split), store, tokenizer, seed=args.seed,
                                          hard_negatives=pools, **common)
            if pool_file:
                note = (f"{len(train.hard_negatives)} of {len(train.image_ids)} train images have a pool from "
                        f"{pool_file}")
            else:
                note = "no pool (--hard_negatives), the 4th choice takes a random image's caption"
            if dist.get_rank() == 0:
                print(f"finetune.py: hard negatives: {note}", flush=True)
        val_pairs = pairs(args.val_split)
        image_ids, captions, caption_image = retrieval_eval_set(val_pairs)
        if args.max_eval_images:
            keep = caption_image < args.max_eval_images
            image_ids = image_ids[: args.max_eval_images]
            captions = [c for c, k in zip(captions, keep.tolist()) if k]
            caption_image = caption_image[keep]
        return train, (image_ids, captions, caption_image), None
    refs = {split: split_file(data_dir, "refs", split, (".json", ".jsonl"))
            for split in (args.train_split, args.val_split)}
    train = None if args.eval_only else ReferringDataset(load_refs(refs[args.train_split]), store, tokenizer, **common)
    return train, ReferringDataset(load_refs(refs[args.val_split]), store, tokenizer, **common), None


def task_targets(task, batch):
    """The task model's label arguments from a collated batch."""
    if task == "vqa":
        return {"answer_scores": batch["answer_scores"]}
    if task == "referring":
        return {"region_scores": batch["region_scores"]}
    groups = batch["input_ids"].shape[0] // NUM_CHOICES
    # Choice 0 of every group is the positive (RetrievalTrainDataset).
    return {"choice_labels": torch.zeros(groups, dtype=torch.long, device=batch["input_ids"].device)}


def evaluate(args, model, val, store, tokenizer, device):
    """The task's metrics on the val split (rank 0), as a flat dict of floats."""
    if args.task == "retrieval":
        image_ids, captions, caption_image = val
        score_fn = alignment_score(model) if args.zero_shot else retrieval_score(model)
        scores = score_all_pairs(score_fn, store, tokenizer, image_ids, captions, image_chunk=args.eval_batch_size,
                                 max_text_len=MAX_TEXT_LEN["retrieval"], max_regions=args.max_regions, device=device)
        recall = retrieval_recall(scores, caption_image)
        for line in summarize_recall(recall):
            print(f"finetune.py: {line}", flush=True)
        return {f"{direction}_R@{k}": value for direction, by_k in recall.items() for k, value in by_k.items()} | {
            "num_images": len(image_ids), "num_captions": len(captions)}
    loader = DataLoader(val, batch_size=args.eval_batch_size, collate_fn=TaskCollator(), num_workers=args.num_workers)
    return evaluate_batches(args.task, model, loader, device)


def main(argv=None):
    rank, world_size = world_from_env(master_port=29501)
    on_gpu = gpu_available()
    try:
        args = parse_args(argv)
        ds_config, device_note = load_ds_config(args.deepspeed_config, world_size, on_gpu)
        if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            raise UsageError(f"{args.deepspeed_config}: ZeRO-3 is not supported by finetune.py; use stage 0-2")
        if args.vocab_file is not None and not os.path.isfile(args.vocab_file):
            raise UsageError(f"--vocab_file {args.vocab_file!r} does not exist")
        tokenizer = load_tokenizer(args.vocab_file)
        # The config comes from a save_pretrained directory, else from --model (fresh weights, or an official
        # checkpoint: a .bin or its directory).
        config = None if is_pretrained_dir(args.init) else build_config(args.model, tokenizer.vocab_size)
        if args.data is not None and not os.path.isdir(args.data):
            raise UsageError(f"--data {args.data!r} is not a directory")
    except UsageError as e:
        if rank == 0:
            print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2
    args.backend = args.backend or default_backend(on_gpu)
    default_workers(args, on_gpu)

    init_distributed(on_gpu)
    if rank == 0:
        print(f"finetune.py: task {args.task}, {device_note}, {world_size} rank(s), backend {args.backend}", flush=True)
    if args.data is None and int(os.environ["LOCAL_RANK"]) == 0:
        ensure_synthetic_tasks()  # one writer per node; the others wait at the barrier
    dist.barrier()
    data_dir = args.data or ensure_synthetic_tasks()
    try:
        store = open_store(args.features or os.path.join(data_dir, FEATURES_DIR))
        train, val, vocab = build_datasets(args, data_dir, store, tokenizer)
        micro = ds_config["train_micro_batch_size_per_gpu"]
        if train is not None and len(train) < micro * world_size:
            raise UsageError(f"the train split has {len(train)} examples, fewer than one micro batch per rank "
                             f"({micro} x {world_size} ranks)")
        torch.manual_seed(args.seed)  # the same initial head weights on every rank
        if args.zero_shot:
            model = load_pretraining_model(args.init, backend=args.backend, architecture=args.architecture)
        else:
            model = load_task_model(args.task, args.init, config, backend=args.backend,
                                    num_answers=None if vocab is None else len(vocab), require_head=args.eval_only,
                                    architecture=args.architecture)
    except (UsageError, ValueError, FileNotFoundError) as e:
        if rank == 0:
            print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"finetune.py: {type(model).__name__} from {args.init or 'random weights'}", flush=True)
    device = (torch.device(get_accelerator().device_name(), int(os.environ["LOCAL_RANK"])) if on_gpu
              else torch.device("cpu"))
    os.makedirs(args.output_dir, exist_ok=True)

    if not args.eval_only:
        model = train_model(args, model, train, ds_config)
        if model is None:  # stopped by a signal before max_steps: checkpoint saved, nothing to export or evaluate
            return 0
        if rank == 0:
            final = os.path.join(args.output_dir, "final")
            model.save_pretrained(final)
            if vocab is not None:
                vocab.save(os.path.join(final, "answers.json"))
            print(f"finetune.py: weights in {final}", flush=True)

    if rank == 0:
        model.to(device)
        start = time.perf_counter()
        record = {"eval": args.val_split, "task": args.task, "init": args.init, "zero_shot": args.zero_shot,
                  **evaluate(args, model, val, store, tokenizer, device)}
        record["eval_seconds"] = time.perf_counter() - start
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
        print(f"finetune.py: eval {json.dumps(record)}", flush=True)
    # No collective after training: the other ranks end while rank 0 evaluates (a barrier would time out on a long
    # evaluation, such as retrieval's every caption x every image).
    return 0


def finetuning_step(engine, batch, task):
    """One micro batch forward (loop.train's micro_step): the loss, and the sums logged per window: the loss and the
    training metric's sum on the device, its example count on the host (see task_hits)."""
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    out = engine(**model_inputs(batch), **task_targets(task, batch))
    hits = task_hits(task, out.logits.detach(), batch)
    return out.loss, torch.stack([out.loss.detach().double(), hits.sum().double()]), [len(hits)]


def summarize(sums, micro_steps, seconds):
    loss, hits, examples = sums
    return {"loss": loss / micro_steps, "train_metric": hits / examples}


def train_model(args, model, train_set, ds_config):
    """Fine-tunes with loop.train; returns the trained model (on rank 0 with its fp32 weights, consolidated from the
    ZeRO shards), or None when a signal stopped the run before max_steps (a checkpoint was saved)."""
    engine, finished = train(args, model, train_set, TaskCollator(), ds_config,
                             functools.partial(finetuning_step, task=args.task), summarize)
    if not finished:
        return None
    if dist.get_rank() != 0:
        return engine.module
    export = type(engine.module)(engine.module.config, backend=args.backend)
    export.load_state_dict(fp32_weights(engine, args.output_dir))
    return export


if __name__ == "__main__":
    sys.exit(main())
