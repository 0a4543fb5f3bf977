"""Referring expressions (RefCOCO / RefCOCO+ / RefCOCOg): pick the region an expression refers to.

Records users have (the refer toolkit's refs joined with the COCO box of each ref's annotation), as a JSON list or
JSON lines: {"ref_id", "image_id", "sentences": ["..."] or [{"sent": "..."}], "bbox": [x, y, w, h]} with bbox in
pixels, COCO's (x, y, width, height). The candidates are the image's detected regions from the feature store.
Training: a per-region score, BCE against 1 where the region's IoU with the ground truth is >= 0.5 (the paper).
Evaluation: the highest-scoring region is correct when its IoU with the ground truth is >= 0.5.
"""
import json
from dataclasses import dataclass
from typing import List, Sequence

import torch

from .common import encode_regions, encode_text, image_key, index_images
from .metrics import referring_targets

IOU_THRESHOLD = 0.5


@dataclass
class ReferringExample:
    ref_id: object
    image_id: object
    sentence: str
    gt_box: List[float]  # (x1, y1, x2, y2) in pixels


def load_refs(path: str) -> List[ReferringExample]:
    """One example per (ref, sentence) from a JSON list or JSON-lines file of RefCOCO-style records."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    records = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.endswith(".jsonl")
               else json.loads(text))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of ref records (or a .jsonl file), "
                         f"got {type(records).__name__}")
    examples = []
    for rec in records:
        missing = {"ref_id", "image_id", "sentences", "bbox"} - set(rec)
        if missing:
            raise ValueError(f"{path}: ref record lacks {sorted(missing)}: {str(rec)[:120]}")
        x, y, w, h = (float(v) for v in rec["bbox"])
        if w < 0 or h < 0:
            raise ValueError(f"{path}: ref {rec['ref_id']} bbox {rec['bbox']} has a negative width or height "
                             f"(expected COCO [x, y, w, h])")
        for sent in rec["sentences"]:
            sentence = sent["sent"] if isinstance(sent, dict) else sent
            examples.append(ReferringExample(rec["ref_id"], image_key(rec["image_id"]), sentence, [x, y, x + w, y + h]))
    return examples


class ReferringDataset(torch.utils.data.Dataset):
    """One expression with its image's regions: the model inputs plus, per region (IMG token first),
    `region_boxes` (V, 4), `region_iou` (V,) and `region_scores` (V,) 1.0 at IoU >= 0.5 (0 for the IMG token),
    and the expression's `gt_box` (4,). Official downstream lengths: 20 tokens, 100 regions (+ the IMG token).
    """

    def __init__(self, examples: Sequence[ReferringExample], store, tokenizer,
                 max_text_len: int = 20, max_regions: int = 100):
        self.examples = list(examples)
        self.store, self.tokenizer = store, tokenizer
        self.max_text_len, self.max_regions = max_text_len, max_regions
        self.image_index = index_images(store)
        missing = {ex.image_id for ex in self.examples} - set(self.image_index)
        if missing:
            raise ValueError(f"{len(missing)} ref image_ids are not in the feature store, "
                             f"e.g. {sorted(missing, key=str)[:3]}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        sample = encode_text(self.tokenizer, ex.sentence, self.max_text_len)
        sample.update(encode_regions(self.store[self.image_index[ex.image_id]], self.max_regions))
        gt_box = torch.tensor(ex.gt_box)
        iou, labels = referring_targets(sample["region_boxes"], gt_box, IOU_THRESHOLD)
        iou[0], labels[0] = 0.0, 0.0  # the IMG token is never a candidate
        sample.update(region_iou=iou.float(), region_scores=labels, gt_box=gt_box)
        return sample


def referring_hits(region_logits: torch.Tensor, batch) -> torch.Tensor:
    """(B, V) region scores -> (B,) 1.0 where the best real region (not IMG, not padding) has IoU >= 0.5."""
    V = region_logits.shape[1]
    real = torch.arange(V, device=region_logits.device)[None, :] < batch["image_lens"][:, None]  # (B, V)
    real[:, 0] = False
    best = region_logits.masked_fill(~real, float("-inf")).argmax(dim=1, keepdim=True)  # (B, 1)
    return (batch["region_iou"].gather(1, best).squeeze(1) >= IOU_THRESHOLD).float()
