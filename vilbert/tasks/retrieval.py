"""Image-text retrieval: caption files, the paper's 4-way multiple-choice training, all-pairs evaluation scoring.

Caption files users have:
  - JSON lines (.jsonl, .jsonline), one {"image_id": ..., "caption": "..."} or {..., "sentences": [...]} per line; the
    vilbert-multi-task files (all_data_final_<split>.jsonline) name the image by "img_path" (Flickr30k,
    "<image_id>.jpg") or "id" (COCO) instead;
  - a JSON object {image_id: [captions]} or {image_id: "caption"} (one split's captions; Karpathy's dataset_*.json,
    which holds every split, is refused with a note to write the split out in this form), or COCO's captions file.
Training (the paper's 4-way multiple choice, drawn as the official fine-tuning draws it): for each (caption, image)
pair, 4 choices scored by a pair-score head, cross-entropy with the positive as the answer: the positive; the image
with a caption of a random other image; a random other image with the caption; the image with a caption of one of its
hard negatives (a pool per image, e.g. its nearest images: vilbert-multi-task's hard_negative.pkl, see
`load_hard_negatives`) or, without a pool, of another random image. Choice 0 is always the positive (the model sees
each pair on its own, so the position does not leak).
"""
import json
import os
import pickle
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from vilbert.data.stores import load_captions as caption_json
from vilbert.model import ViLBERTOutput

from .common import TaskCollator, encode_regions, encode_text, eval_mode, image_key, index_images, item_generator

NUM_CHOICES = 4
JSON_LINES_SUFFIXES = (".jsonl", ".jsonline", ".jsonlines")


def _line_image_id(rec: dict):
    """A caption line's image id: "image_id", else the vilbert-multi-task files' "img_path" stem when it is a number
    (Flickr30k's "<image_id>.jpg", which its official reader uses), else their "id" (COCO's); None if none."""
    if "image_id" in rec:
        return rec["image_id"]
    stem = os.path.splitext(os.path.basename(str(rec.get("img_path", ""))))[0]
    if stem.isdigit() or ("id" not in rec and stem):
        return stem
    return rec.get("id")


def load_captions(path: str) -> List[Tuple[object, str]]:
    """(image_id, caption) pairs from a JSON-lines caption file (vilbert-multi-task's .jsonline) or a JSON one (any
    layout `vilbert.data.stores.load_captions` reads: {image_id: caption or [captions]}, COCO's annotations), in file
    order."""
    pairs = []
    if path.endswith(JSON_LINES_SUFFIXES):
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            image_id = _line_image_id(rec)
            if image_id is None or ("caption" not in rec and "sentences" not in rec):
                raise ValueError(f"{path}:{line_no}: expected an image id (image_id, id or img_path) and caption "
                                 f"(or sentences), got keys {sorted(rec)}")
            captions = rec["sentences"] if "sentences" in rec else [rec["caption"]]
            pairs.extend((image_key(image_id), c) for c in captions)
    else:
        pairs = [(image_key(image_id), caption)
                 for image_id, captions in caption_json(path).items() for caption in captions]
    if not pairs:
        raise ValueError(f"{path}: no captions found")
    return pairs


def load_hard_negatives(path: str) -> Dict[object, List]:
    """{image_id: [hard negative image_ids]} from vilbert-multi-task's hard_negative.pkl (`train_image_list`, and
    `train_hard_pool`: per image of that list, indices into it of its nearest images, the first one skipped as the
    official reader skips it) or from a JSON object {image_id: [image_ids]}. A pickle can run code when loaded: load
    only files you trust."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            pools = json.load(f)
        if not isinstance(pools, dict) or not all(isinstance(v, list) for v in pools.values()):
            raise ValueError(f"{path}: expected a JSON object {{image_id: [image_ids]}}")
        return {image_key(k): [image_key(v) for v in vs] for k, vs in pools.items()}
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
        images, pool = list(data["train_image_list"]), data["train_hard_pool"]
        return {image_key(images[row]): [image_key(images[int(j)]) for j in pool[row][1:]]
                for row in range(len(images))}
    except (pickle.UnpicklingError, EOFError, TypeError, KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{path}: expected vilbert-multi-task's hard_negative.pkl (or a .json file), a dict with "
                         f"train_image_list and train_hard_pool (one row of indices into the list per image) "
                         f"({error!r})") from None


class RetrievalTrainDataset(torch.utils.data.Dataset):
    """Item i: the NUM_CHOICES samples (a list of dicts, positive first) of pair i; see the module docstring.

    Random choices come from a generator seeded by (seed, epoch, i), so an item does not depend on batch composition.
    hard_negatives: {image_id: [candidate image_ids]} (`load_hard_negatives`); candidates without captions among
    `pairs` are skipped.
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
        self.captions_of = {}
        for image_id, caption in self.pairs:
            self.captions_of.setdefault(image_id, []).append(caption)
        self.image_ids = sorted(self.captions_of, key=str)
        if len(self.image_ids) < 2:
            raise ValueError("retrieval training needs captions of at least 2 images "
                             "(negatives come from other images)")
        self.image_position = {image_id: n for n, image_id in enumerate(self.image_ids)}
        self.hard_negatives = {}
        for image_id, candidates in (hard_negatives or {}).items():
            image_id = image_key(image_id)
            pool = [c for c in map(image_key, candidates) if c in self.captions_of and c != image_id]
            if pool and image_id in self.captions_of:
                self.hard_negatives[image_id] = pool
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

    def _caption_of(self, image_id, g: torch.Generator) -> str:
        captions = self.captions_of[image_id]
        return captions[int(torch.randint(len(captions), (), generator=g))]

    def __getitem__(self, i: int) -> List[dict]:
        g = item_generator(self.seed, self.epoch, i)
        image_id, caption = self.pairs[i]
        pool = self.hard_negatives.get(image_id)
        hard_image = pool[int(torch.randint(len(pool), (), generator=g))] if pool else self._other_image(image_id, g)
        return [self._sample(image_id, caption),
                self._sample(image_id, self._caption_of(self._other_image(image_id, g), g)),
                self._sample(self._other_image(image_id, g), caption),
                self._sample(image_id, self._caption_of(hard_image, g))]


def retrieval_eval_set(pairs: Sequence[Tuple[object, str]]) -> Tuple[list, List[str], torch.Tensor]:
    """(image_ids (I), captions (C), caption_image (C,) index into image_ids) for an all-pairs evaluation."""
    image_ids = list(dict.fromkeys(image_key(i) for i, _ in pairs))
    position = {image_id: n for n, image_id in enumerate(image_ids)}
    captions = [c for _, c in pairs]
    caption_image = torch.tensor([position[image_key(i)] for i, _ in pairs])
    return image_ids, captions, caption_image


class PairScorer:
    """Scores (caption, image) pairs with a model's encoder (`model.bert`) and a head on its ViLBERTOutput.

    Called on a batch of pairs (the model's input keys), it runs the whole model: head(encoder(**batch)) -> (rows,).
    For `score_all_pairs` it splits the work in three: `text` once per caption, `image` once per image, `pairs` per
    (caption, chunk of images). With an encoder that has per-stream prefixes (ViLBERTModel's encode_text, encode_image,
    fuse_streams) `text` and `image` run them and `pairs` only the fused rest; with any other encoder (the
    single-stream model has no text-only layers) `text` and `image` keep the inputs and `pairs` runs the whole model.
    `model`, when given, is the module that holds encoder and head: `score_all_pairs` runs it in eval mode.
    """

    def __init__(self, encoder: Callable[..., ViLBERTOutput], head: Callable[[ViLBERTOutput], torch.Tensor],
                 model: Optional[torch.nn.Module] = None):
        self.encoder, self.head, self.model = encoder, head, model
        self.shares_prefixes = all(hasattr(encoder, name) for name in ("encode_text", "encode_image", "fuse_streams"))

    def __call__(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encoder(**batch))

    def text(self, input_ids, token_type_ids, text_lens) -> Dict[str, torch.Tensor]:
        """(B, T) token ids and types, (B,) lengths -> the text side of `pairs`."""
        if not self.shares_prefixes:
            return {"input_ids": input_ids, "token_type_ids": token_type_ids, "text_lens": text_lens}
        return {"text": self.encoder.encode_text(input_ids, token_type_ids, text_lens), "text_lens": text_lens}

    def image(self, image_features, image_locations, image_lens) -> Dict[str, torch.Tensor]:
        """(B, V, v_feature_size) features, (B, V, 5) locations, (B,) lengths -> the image side of `pairs`."""
        if not self.shares_prefixes:
            return {"image_features": image_features, "image_locations": image_locations, "image_lens": image_lens}
        return {"image": self.encoder.encode_image(image_features, image_locations, image_lens),
                "image_lens": image_lens}

    def pairs(self, text: Dict[str, torch.Tensor], image: Dict[str, torch.Tensor]) -> torch.Tensor:
        """One caption's `text` (batch of 1) against R images' `image` -> (R,) scores."""
        rows = image["image_lens"].shape[0]
        text = {k: v.expand((rows,) + v.shape[1:]) for k, v in text.items()}  # the caption as (R, ...) views, no copy
        if not self.shares_prefixes:
            return self({**text, **image})
        return self.head(self.encoder.fuse_streams(text["text"], image["image"], text["text_lens"],
                                                   image["image_lens"]))


@torch.no_grad()
def score_all_pairs(score_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor], store, tokenizer,
                    image_ids: Sequence, captions: Sequence[str], image_chunk: int = 100,
                    max_text_len: int = 30, max_regions: int = 100, device="cpu") -> torch.Tensor:
    """The (I, C) score matrix of every image against every caption.

    Each image is read, encoded and padded once, and each caption tokenized once; one caption is scored against
    `image_chunk` images per model call. score_fn: a `PairScorer` (vilbert.tasks.models.retrieval_score or
    alignment_score), whose model runs its text-only layers once per caption and its image-only layers once per image
    where it has them, in eval mode (no dropout); or any callable batch -> (rows,) scores, run on whole batches of
    pairs.
    """
    if not isinstance(score_fn, PairScorer):
        score_fn = PairScorer(encoder=lambda **batch: batch, head=score_fn)  # no prefixes: score_fn sees each batch
    image_index = index_images(store)
    images = TaskCollator()([encode_regions(store[image_index[image_key(i)]], max_regions) for i in image_ids])
    scores = torch.empty(len(image_ids), len(captions))
    with eval_mode(score_fn.model):
        chunks = [score_fn.image(*(images[k][start: start + image_chunk].to(device)
                                   for k in ("image_features", "image_locations", "image_lens")))
                  for start in range(0, len(image_ids), image_chunk)]
        for c, caption in enumerate(captions):
            tokens = encode_text(tokenizer, caption, max_text_len)
            text = score_fn.text(*(tokens[k][None].to(device) for k in ("input_ids", "token_type_ids", "text_lens")))
            start = 0
            for image in chunks:
                rows = image["image_lens"].shape[0]
                scores[start: start + rows, c] = score_fn.pairs(text, image).float().cpu()
                start += rows
    return scores
