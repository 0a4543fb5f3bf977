"""What every downstream task shares: text and region encoding into the model's batch keys, and padding.

A task sample is a dict of tensors with the model's input keys (as in pretraining, without the pretraining targets):
  input_ids (T,), token_type_ids (T,), text_lens (), image_features (V, 2048), image_locations (V, 5), image_lens ()
plus the task's own targets. `TaskCollator` pads them at the end into (B, T) / (B, V, ...) batches.
"""
import contextlib
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from vilbert.data.pretrain import IMG_LOCATION, image_locations


@contextlib.contextmanager
def eval_mode(model: Optional[torch.nn.Module]):
    """Runs the block with `model` in eval mode (no dropout) and puts back its train/eval mode after; None: nothing."""
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        yield
    finally:
        if model is not None:
            model.train(was_training)


def index_images(store) -> Dict[object, int]:
    """{image_id: position} for a feature store (a random-access sequence of records with an `image_id`).

    The stores list their ids without decoding the features (`image_ids()`), so a damaged record shows when a
    dataset reads it, not here; any other sequence is read record by record.
    """
    ids = store.image_ids() if hasattr(store, "image_ids") else [store[i]["image_id"] for i in range(len(store))]
    return {image_key(image_id): position for position, image_id in enumerate(ids)}


def image_key(image_id):
    """Image ids compare as ints when they look like ints: annotation files hold ints, stores hold strings."""
    if isinstance(image_id, bytes):
        image_id = image_id.decode()
    if isinstance(image_id, str) and image_id.isdigit():
        return int(image_id)
    return image_id


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator for one item's random choices, from (seed, epoch, index) only (not batch or worker layout):
    seeded by a hash of the three, so every (seed, epoch, index) gets its own stream, whatever their size."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def encode_text(tokenizer, text: str, max_text_len: int) -> Dict[str, torch.Tensor]:
    """"[CLS] text [SEP]" truncated to max_text_len tokens -> input_ids, token_type_ids (zeros), text_lens."""
    if max_text_len < 2:
        raise ValueError(f"max_text_len must be >= 2 ([CLS] and [SEP]), got {max_text_len}")
    ids = tokenizer.encode(text, max_len=max_text_len)
    ids = torch.as_tensor(ids, dtype=torch.long)
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "text_lens": torch.tensor(len(ids))}


def encode_regions(record: Mapping, max_regions: int) -> Dict[str, torch.Tensor]:
    """A store record -> image_features (V, 2048), image_locations (V, 5), image_lens, region_boxes (V, 4).

    As in pretraining (vilbert.data.pretrain): the first max_regions regions are kept (detector order, most confident
    first) and the IMG token comes on top as region 0, so V = 1 + min(num_boxes, max_regions): its feature is the mean
    of the kept regions' features, its location [0, 0, 1, 1, 1]. `region_boxes` are the pixel boxes (the IMG token's
    is the whole image), for referring expressions.
    """
    if max_regions < 1:
        raise ValueError(f"max_regions must be >= 1, got {max_regions}")
    # Copies: a store's arrays may be read-only views of its bytes (float16 features in the native store).
    features = torch.from_numpy(np.array(record["features"][:max_regions], dtype=np.float32))  # (N, 2048)
    boxes = torch.from_numpy(np.array(record["boxes"][:max_regions], dtype=np.float32))  # (N, 4)
    if features.shape[0] == 0:
        raise ValueError(f"image {record.get('image_id')!r} has no regions")
    w, h = float(record["image_w"]), float(record["image_h"])
    locations = torch.from_numpy(image_locations(boxes.numpy(), w, h))  # (N, 5)
    return {
        "image_features": torch.cat([features.mean(dim=0, keepdim=True), features]),  # (N+1, 2048)
        "image_locations": torch.cat([torch.tensor([IMG_LOCATION]), locations]),  # (N+1, 5)
        "image_lens": torch.tensor(features.shape[0] + 1),
        "region_boxes": torch.cat([torch.tensor([[0.0, 0.0, w, h]]), boxes]),  # (N+1, 4)
    }


class TaskCollator:
    """Pads task samples at the end into a batch: 0-d tensors are stacked, others padded with zeros along dim 0.

    An item may be one sample (a dict) or a group of samples (a list of dicts, e.g. the 4 choices of a retrieval
    multiple-choice question); groups are flattened in order, so a batch of B groups of 4 has 4B rows.
    """

    def __call__(self, items: Sequence[Union[Mapping, List[Mapping]]]) -> Dict[str, torch.Tensor]:
        samples = [s for item in items for s in (item if isinstance(item, list) else [item])]
        if not samples:
            raise ValueError("cannot collate an empty batch")
        batch = {}
        for key in samples[0]:
            values = [s[key] for s in samples]
            if values[0].dim() == 0:
                batch[key] = torch.stack(values)
                continue
            length = max(v.shape[0] for v in values)
            padded = values[0].new_zeros((len(values), length) + tuple(values[0].shape[1:]))
            for row, v in enumerate(values):
                padded[row, : v.shape[0]] = v
            batch[key] = padded
        return batch


MODEL_INPUT_KEYS = ("input_ids", "token_type_ids", "text_lens", "image_features", "image_locations", "image_lens")


def model_inputs(batch: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The batch keys the model's forward takes (the rest are task targets and ids)."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS}
