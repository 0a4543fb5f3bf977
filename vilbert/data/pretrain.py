"""Pretraining samples: the paper's masking and alignment negatives per sample, and the collator that pads a batch.

Shapes (legend: T_i / V_i = this sample's text / visual length, T / V = the batch's longest, C = num_classes):

    sample (PretrainDataset[i])                 batch (PretrainCollator)
    input_ids        (T_i,) int64              (B, T) int64, padding = tokenizer's [PAD] id (0)
    token_type_ids   (T_i,) int64, zeros       (B, T)
    mlm_labels       (T_i,) int64, -100 = none (B, T), -100 at padding
    image_features   (V_i, 2048) float32       (B, V, 2048), zeros at padding
    image_locations  (V_i, 5) float32          (B, V, 5), zeros at padding
    region_mask      (V_i,) bool               (B, V), False at padding
    region_targets   (M_i, C) float32          (M, C): M = region_mask.sum(), one row per masked region in
                                               row-major (b, v) order, as region_mask selects them
    is_aligned       () int64                  (B,)
                                               text_lens (B,), image_lens (B,) int64

Region targets come only for the masked regions (about 15%): padded to (B, V, C) they would be the largest tensor of
a batch (C = 1601), nearly all zeros, copied by the loader and to the device every step.

Region 0 is the IMG token: its feature is the mean of the real regions' features after masking, its location
[0, 0, 1, 1, 1]; it is never masked. V_i = 1 + min(num_boxes, max_regions).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from ..model import IGNORE_INDEX
from .stores import BadRecordError, describe_record, open_store, validate_record

TOKEN_MASK_PROB = 0.15
REGION_MASK_PROB = 0.15
SWAP_PROB = 0.5
IMG_LOCATION = (0.0, 0.0, 1.0, 1.0, 1.0)


def image_locations(boxes: np.ndarray, image_w: float, image_h: float) -> np.ndarray:
    """(N, 4) pixel boxes [x1, y1, x2, y2] -> (N, 5) float32 [x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W*H)]."""
    boxes = np.asarray(boxes, dtype=np.float32)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (image_w * image_h)
    scaled = boxes / np.array([image_w, image_h, image_w, image_h], dtype=np.float32)
    return np.concatenate([scaled, area[:, None]], axis=1).astype(np.float32)


class PretrainDataset(Dataset):
    """One masked pretraining sample per image.

    store: a sequence of records with captions and cls_prob (see vilbert.data.open_store), or a path to open.
    tokenizer: see vilbert.data.load_tokenizer.
    seed: every random choice for sample i of epoch e comes from np.random.default_rng([seed, e, i]), so a sample does
        not depend on batching, rank count or worker count. Call set_epoch(e) each epoch.
    max_text_len: tokens including [CLS] and [SEP] (36 in the paper). max_regions: real regions kept (36), the first
        ones (detectors order them by confidence); the IMG token comes on top.
    drop_masked_loss_on_negatives: a swapped-caption sample keeps its masked inputs but has no MLM or region targets.
    skip_bad: a bad record (unreadable, bad shapes, NaN, no caption or cls_prob) is replaced by the next good one and
        counted in `num_skipped` (per process, with a warning naming it) instead of raising BadRecordError.
    """

    def __init__(self, store, tokenizer, seed: int = 0, max_text_len: int = 36, max_regions: int = 36,
                 drop_masked_loss_on_negatives: bool = False, skip_bad: bool = False):
        store = open_store(store) if isinstance(store, (str, os.PathLike)) else store
        if len(store) < 2:
            raise ValueError(f"store needs >= 2 records (alignment negatives take another image's caption), "
                             f"got {len(store)}")
        if max_text_len < 3:
            raise ValueError(f"max_text_len must be >= 3 ([CLS], a word piece, [SEP]), got {max_text_len}")
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {max_regions}")
        self.store = store
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0
        self.max_text_len = max_text_len
        self.max_regions = max_regions
        self.drop_masked_loss_on_negatives = drop_masked_loss_on_negatives
        self.skip_bad = skip_bad
        self.num_skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.store)

    def _record(self, index: int, exclude: int | None = None) -> tuple[int, dict]:
        """(index, record `index`) checked for what pretraining needs; with skip_bad the next good record (never
        `exclude`) and its index."""
        for offset in range(len(self.store)):
            position = (index + offset) % len(self.store)
            if position == exclude:
                continue
            try:
                return position, self._checked(position)
            except BadRecordError as error:
                if not self.skip_bad:
                    raise
                self.num_skipped += 1
                warnings.warn(f"skipping bad record: {error}", stacklevel=2)
        raise BadRecordError(f"no good record left in the store to replace record {index}")

    def _checked(self, index: int) -> dict:
        record = self.store[index]
        where = describe_record(getattr(self.store, "path", "store"), index, record.get("image_id"))
        record = validate_record(record, where, index)
        for field in ("captions", "cls_prob"):
            if field not in record:
                raise BadRecordError(f"{where}: no {field} (pretraining needs captions and detector class "
                                     f"distributions)", index=index, image_id=record["image_id"])
        return record

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        position, record = self._record(index)

        # Alignment negative: the caption of another image, never this one.
        is_aligned = rng.random() >= SWAP_PROB
        if is_aligned:
            captions = record["captions"]
        else:
            other = int(rng.integers(len(self) - 1))
            other += other >= position
            captions = self._record(other, exclude=position)[1]["captions"]
        caption = captions[rng.integers(len(captions))]

        input_ids, mlm_labels = self._mask_tokens(rng, np.array(self.tokenizer.encode(caption, self.max_text_len)))
        features, locations, region_targets, region_mask = self._mask_regions(rng, record)
        if not is_aligned and self.drop_masked_loss_on_negatives:
            mlm_labels[:] = IGNORE_INDEX
            region_targets = region_targets[:0]
            region_mask[:] = False
        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.zeros(len(input_ids), dtype=torch.int64),
            "mlm_labels": torch.from_numpy(mlm_labels),
            "image_features": torch.from_numpy(features),
            "image_locations": torch.from_numpy(locations),
            "region_targets": torch.from_numpy(region_targets),
            "region_mask": torch.from_numpy(region_mask),
            "is_aligned": torch.tensor(int(is_aligned), dtype=torch.int64),
        }

    def _mask_tokens(self, rng: np.random.Generator, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """15% of the word pieces ([CLS]/[SEP] excluded) become targets: 80% -> [MASK], 10% -> a random word piece,
        10% unchanged. ids (T_i,) int64 -> (masked ids, labels)."""
        tokenizer = self.tokenizer
        # Draw for every position (fixed count of draws), then restrict to the word pieces.
        chosen = rng.random(len(ids)) < TOKEN_MASK_PROB
        action = rng.random(len(ids))
        random_words = tokenizer.word_ids[rng.integers(len(tokenizer.word_ids), size=len(ids))]
        chosen[0] = chosen[-1] = False  # [CLS], [SEP]
        labels = np.where(chosen, ids, IGNORE_INDEX).astype(np.int64)
        masked = ids.astype(np.int64).copy()
        masked[chosen & (action < 0.8)] = tokenizer.mask_id
        replace = chosen & (action >= 0.8) & (action < 0.9)
        masked[replace] = random_words[replace]
        return masked, labels

    def _mask_regions(self, rng: np.random.Generator, record: dict):
        """15% of the real regions become targets (90% of them zeroed, 10% unchanged); prepends the IMG token.
        Returns features (V_i, 2048), locations (V_i, 5), the targets' class distributions (M_i, C), region_mask
        (V_i,)."""
        features = record["features"][: self.max_regions].astype(np.float32)  # (N, 2048), a copy of the store's
        num_regions = features.shape[0]
        chosen = rng.random(num_regions) < REGION_MASK_PROB
        zeroed = chosen & (rng.random(num_regions) < 0.9)
        features[zeroed] = 0.0
        img_feature = features.mean(axis=0, keepdims=True)  # after masking, as the official code
        features = np.concatenate([img_feature, features])  # (V_i, 2048)

        locations = image_locations(record["boxes"][: self.max_regions], record["image_w"], record["image_h"])
        locations = np.concatenate([np.array([IMG_LOCATION], dtype=np.float32), locations])  # (V_i, 5)

        region_targets = record["cls_prob"][: self.max_regions][chosen].astype(np.float32)  # (M_i, C)
        # Stored distributions are fp16: renormalize so each target sums to 1 exactly.
        region_targets /= np.maximum(region_targets.sum(axis=1, keepdims=True), 1e-12)
        region_mask = np.concatenate([[False], chosen])
        return features, locations, region_targets, region_mask


class PretrainCollator:
    """Pads a list of PretrainDataset samples to the batch's longest text and region count (padding at the end).

    pad_id: the tokenizer's [PAD] id (0 in BERT's vocab and in the shipped one).
    """

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("samples must be a non-empty list")
        text_lens = torch.tensor([len(s["input_ids"]) for s in samples], dtype=torch.int64)
        image_lens = torch.tensor([len(s["image_features"]) for s in samples], dtype=torch.int64)
        text_len, image_len = int(text_lens.max()), int(image_lens.max())

        def pad(key: str, length: int, value=0):
            first = samples[0][key]
            out = torch.full((len(samples), length, *first.shape[1:]), value, dtype=first.dtype)
            for row, sample in enumerate(samples):
                out[row, : len(sample[key])] = sample[key]
            return out

        return {
            "input_ids": pad("input_ids", text_len, self.pad_id),
            "token_type_ids": pad("token_type_ids", text_len),
            "text_lens": text_lens,
            "image_features": pad("image_features", image_len),
            "image_locations": pad("image_locations", image_len),
            "image_lens": image_lens,
            "mlm_labels": pad("mlm_labels", text_len, IGNORE_INDEX),
            "region_mask": pad("region_mask", image_len, False),
            "region_targets": torch.cat([s["region_targets"] for s in samples]),
            "is_aligned": torch.stack([s["is_aligned"] for s in samples]),
        }
