"""Held-out pretraining metrics of a checkpoint: alignment accuracy, masked-token accuracy, masked-region KL.

    python train/evaluate_pretraining.py --init runs/pretrain/final
    python train/evaluate_pretraining.py --init runs/pretrain/final --data /data/cc_val_features --num_images 5000

Without --data it scores images of the built-in synthetic data that the default pretraining run never saw: the
generator makes image i from (seed, i) alone, and the default store holds the first DEFAULT_NUM_IMAGES, so images from
that index on are new (written to a temporary store, a few seconds). Masks and swapped captions are drawn as in
pretraining, from --seed, so two checkpoints (two-stream and single-stream alike) are scored on the same samples. The
model runs in eval mode (no dropout), in one process, on the GPU when there is one. Prints one JSON line.
"""
import argparse
import json
import os
import sys
import tempfile

import torch

from vilbert.config import BACKENDS, default_backend
from vilbert.data import PretrainCollator, PretrainDataset, load_tokenizer, open_store, write_synthetic
from vilbert.data.synthetic import DEFAULT_NUM_IMAGES
from vilbert.model import pretraining_hits
from vilbert.tasks.models import load_pretraining_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init", required=True, help="a pretraining checkpoint directory (pretrain.py's final/)")
    parser.add_argument("--data",
                        help="a feature store with captions and cls_prob (default: held-out synthetic images)")
    parser.add_argument("--num_images", type=int, default=1024, help="images scored (the first ones of --data)")
    parser.add_argument("--vocab_file", help="BERT vocab.txt (default: the vocab shipped for the built-in data)")
    parser.add_argument("--seed", type=int, default=0, help="draws the masks and the swapped captions")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--backend", choices=BACKENDS,
                        help="op backend (default: triton on a GPU, torch on the CPU)")
    args = parser.parse_args(argv)
    for name in ("num_images", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.data is not None and not os.path.exists(args.data):
        parser.error(f"--data {args.data!r} does not exist")
    return args


@torch.no_grad()
def evaluate(model, dataset, batch_size, device) -> dict:
    """Sums over the whole dataset (not means of batch means): alignment hits per sample, masked-token hits per
    target, region KL per masked region."""
    model.eval()
    collate = PretrainCollator()
    align_hits = mlm_hits = mlm_targets = region_kl = masked_regions = 0.0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        batch_mlm_hits, batch_mlm_targets, batch_align_hits = pretraining_hits(out, batch["mlm_labels"],
                                                                              batch["is_aligned"])
        mlm_hits += batch_mlm_hits.item()
        mlm_targets += batch_mlm_targets.item()
        align_hits += batch_align_hits.item()
        count = batch["region_mask"].sum().item()
        region_kl += out.region_loss.item() * count  # region_loss: the mean over this batch's masked regions
        masked_regions += count
    return {"align_acc": align_hits / len(dataset), "mlm_acc": mlm_hits / max(mlm_targets, 1),
            "region_loss": region_kl / max(masked_regions, 1), "num_images": len(dataset),
            "mlm_targets": int(mlm_targets), "masked_regions": int(masked_regions)}


def main(argv=None):
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    try:
        model = load_pretraining_model(args.init, backend=args.backend or default_backend(on_gpu))
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate_pretraining.py: error: {e}", file=sys.stderr)
        return 2
    model.to(device)
    tokenizer = load_tokenizer(args.vocab_file)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            data = os.path.join(tmp, "heldout")
            write_synthetic(data, args.num_images, first_index=DEFAULT_NUM_IMAGES)
        else:
            data = args.data
        store = open_store(data)
        indices = range(min(args.num_images, len(store)))
        dataset = PretrainDataset(torch.utils.data.Subset(store, indices) if len(indices) < len(store) else store,
                                  tokenizer, seed=args.seed)
        record = {"init": args.init, "data": args.data or f"synthetic images {DEFAULT_NUM_IMAGES}.. (held out)",
                  **evaluate(model, dataset, args.batch_size, device)}
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
