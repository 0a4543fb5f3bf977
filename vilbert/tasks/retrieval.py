"""Image-text retrieval: caption files, the paper's 4-way multiple-choice training, all-pairs evaluation scoring.

Caption files users have:
  - JSON lines, one {"image_id": ..., "caption": "..."} (or "sentences": [...]) per line (the mt retrieval layout);
  - a JSON object {image_id: [captions]} (Flickr30k / COCO Karpathy-style) or {image_id: "caption"}.
Training (as the paper): for each (caption, image) pair, 4 choices scored by a pair-score head, cross-entropy with the
positive as the answer: the positive, the image with a random other caption, the caption with a random other image,
and a hard negative image from a given pool (per image, e.g. its 100 nearest images) or, without a pool, a second
random image. Choice 0 is always the positive (the model sees each pair on its own, so the position does not leak).
"""
import json
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .common import TaskCollator, encode_regions, encode_text, image_key, index_images, item_generator

NUM_CHOICES = 4


def load_captions(path: str) -> List[Tuple[object, str]]:
    """(image_id, caption) pairs from a JSON-lines or JSON caption file, in file order."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    pairs = []
    if path.endswith(".jsonl"):
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "image_id" not in rec or ("caption" not in rec and "sentences" not in rec):
                raise ValueError(f"{path}:{line_no}: expected keys image_id and caption (or sentences), "
                                 f"got {sorted(rec)}")
            captions = rec["sentences"] if "sentences" in rec else [rec["caption"]]
            pairs.extend((image_key(rec["image_id"]), c) for c in captions)
    else:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{image_id: [captions]}} (or a .jsonl file), "
                             f"got a {type(data).__name__}")
        for image_id, captions in data.items():
            captions = [captions] if isinstance(captions, str) else captions
            pairs.extend((image_key(image_id), c) for c in captions)
    if not pairs:
        raise ValueError(f"{path}: no captions found")
    return pairs


class RetrievalTrainDataset(torch.utils.data.Dataset):
    """Item i: the NUM_CHOICES samples (a list of dicts, positive first) of pair i; see the module docstring.

    Random choices come from a generator seeded by (seed, epoch, i), so an item does not depend on batch composition.
    hard_negatives: {image_id: [candidate image_ids]} (ids that are not in the store are skipped).
    """

    def __init__(self, pairs: Sequence[Tuple[object, str]], store, tokenizer, seed: int = 0,
                 hard_negatives: Optional[Mapping[object, Sequence]] = None,
                 max_text_len: int = 30, max_regions: int = 100):
        self.pairs = [(image_key(i), c) for i, c in pairs]
        self.store, self.tokenizer, self.seed = store, tokenizer, seed
        self.max_text_len, self.max_regions = max_text_len, max_regions
        self.image_index = index_images(store)
        missing = {i for i, _ in self.pairs} - set(self.image_index)
        if missing:
            raise ValueError(f"{len(missing)} caption image_ids are not in the feature store, "
                             f"e.g. {sorted(missing, key=str)[:3]}")
        self.image_ids = sorted({i for i, _ in self.pairs}, key=str)
        if len(self.image_ids) < 2:
            raise ValueError("retrieval training needs captions of at least 2 images "
                             "(negatives come from other images)")
        self.image_position = {image_id: n for n, image_id in enumerate(self.image_ids)}
        self.hard_negatives = {image_key(k): [image_key(v) for v in vs if image_key(v) in self.image_index]
                               for k, vs in (hard_negatives or {}).items()}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def _sample(self, image_id, caption: str) -> dict:
        sample = encode_text(self.tokenizer, caption, self.max_text_len)
        sample.update(encode_regions(self.store[self.image_index[image_id]], self.max_regions))
        del sample["region_boxes"]
        return sample

    def _other_image(self, image_id, g: torch.Generator):
        j = int(torch.randint(len(self.image_ids) - 1, (), generator=g))
        j += j >= self.image_position[image_id]  # skip the image itself
        return self.image_ids[j]

    def __getitem__(self, i: int) -> List[dict]:
        g = item_generator(self.seed, self.epoch, i)
        image_id, caption = self.pairs[i]
        # A random caption of another image (drawn over pairs, so images with more captions are picked more often).
        while True:
            other_image, other_caption = self.pairs[int(torch.randint(len(self.pairs), (), generator=g))]
            if other_image != image_id:
                break
        pool = [p for p in self.hard_negatives.get(image_id, []) if p != image_id]
        hard_image = (pool[int(torch.randint(len(pool), (), generator=g))] if pool
                      else self._other_image(image_id, g))
        return [self._sample(image_id, caption), self._sample(image_id, other_caption),
                self._sample(self._other_image(image_id, g), caption), self._sample(hard_image, caption)]


def retrieval_eval_set(pairs: Sequence[Tuple[object, str]]) -> Tuple[list, List[str], torch.Tensor]:
    """(image_ids (I), captions (C), caption_image (C,) index into image_ids) for an all-pairs evaluation."""
    image_ids = list(dict.fromkeys(image_key(i) for i, _ in pairs))
    position = {image_id: n for n, image_id in enumerate(image_ids)}
    captions = [c for _, c in pairs]
    caption_image = torch.tensor([position[image_key(i)] for i, _ in pairs])
    return image_ids, captions, caption_image


@torch.no_grad()
def score_all_pairs(score_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor], store, tokenizer,
                    image_ids: Sequence, captions: Sequence[str], image_chunk: int = 100,
                    max_text_len: int = 30, max_regions: int = 100, device="cpu") -> torch.Tensor:
    """The (I, C) score matrix of every image against every caption.

    Each image is read and encoded once and the image side is padded and moved to the device once; each caption is
    tokenized once and broadcast over chunks of `image_chunk` images, so one model call scores one caption against
    `image_chunk` images. score_fn(batch) -> (rows,) scores (e.g. the retrieval head's logit or the alignment logit).
    """
    image_index = index_images(store)
    images = TaskCollator()([encode_regions(store[image_index[image_key(i)]], max_regions) for i in image_ids])
    images = {k: images[k].to(device) for k in ("image_features", "image_locations", "image_lens")}
    scores = torch.empty(len(image_ids), len(captions))
    for c, caption in enumerate(captions):
        text = {k: v.to(device) for k, v in encode_text(tokenizer, caption, max_text_len).items()}
        for start in range(0, len(image_ids), image_chunk):
            chunk = {k: v[start: start + image_chunk] for k, v in images.items()}
            rows = chunk["image_lens"].shape[0]
            batch = {k: v.expand((rows,) + v.shape) for k, v in text.items()}  # (rows, T) views, no copy
            batch.update(chunk)
            scores[start: start + rows, c] = score_fn(batch).float().cpu()
    return scores
