"""The built-in data: synthetic grounded image-caption pairs that a model can learn from, with no download.

An "image" is 3-8 objects of distinct classes. Each class has a fixed random, sparse, non-negative 2048-d embedding
(like a detector's ReLU features); a region's feature is its class embedding, scaled and noised, clipped at zero. Each
region gets a box in pixels and a detector-like class distribution over the 1601 Visual Genome classes (most mass on the
true class, some on one confusable class, the rest spread thin). Each image gets two captions that name 2-4 of its
objects, most led by a true spatial relation between two of them ("a dog to the left of a red cube , a cup and a bus").
So the three pretraining tasks are learnable: a masked word is named by a region's features, a masked region's class by
the caption and its box, and a swapped caption names objects the image lacks.

Everything is deterministic from the seed; image i depends only on (seed, i): a smaller store is a prefix of a larger.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from .stores import NativeStore, StoreWriter

# 30 object classes; each maps to a class index of the 1601-way detector target space (0 = background).
OBJECT_NAMES = (
    "dog", "cat", "horse", "bird", "cow", "sheep", "car", "bus", "bicycle", "boat",
    "tree", "house", "person", "chair", "table", "cup", "lamp", "clock", "book", "umbrella",
    "bench", "kite", "pizza", "apple", "banana", "red cube", "blue ball", "green bottle", "yellow flower", "black bag",
)
CLASS_INDEX = tuple(1 + 53 * k for k in range(len(OBJECT_NAMES)))  # spread over 1..1538
NUM_CLASSES = 1601
FEATURE_DIM = 2048
# Spatial relations a caption may state, each true of the two boxes it names (A's box entirely left of / ... B's box).
RELATIONS = {
    "to the left of": lambda a, b: a[2] <= b[0],
    "to the right of": lambda a, b: a[0] >= b[2],
    "above": lambda a, b: a[3] <= b[1],
    "below": lambda a, b: a[1] >= b[3],
}
RELATION_TEMPLATE = "{0} {relation} {1}"  # over noun phrases ("a dog", "an apple")
# A caption names 2..MAX_NAMED objects (all of them in a smaller image): enough that a swapped-in caption almost always
# names an object the image lacks, few enough that captions stay short (at most 18 word pieces).
MAX_NAMED = 4
RELATION_PROB = 0.6  # how often a caption leads with a relation, where one holds between two of its objects
CAPTIONS_PER_IMAGE = 2
DEFAULT_NUM_IMAGES = 3000
DEFAULT_SEED = 0


def noun_phrase(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def vocabulary_words() -> list[str]:
    """Every word the captions can contain (the shipped vocab holds these, see tokenizer.py)."""
    texts = [*OBJECT_NAMES, *RELATIONS, "a an", ", and"]  # noun_phrase's articles, the list's joints
    words = {word for text in texts for word in text.split() if not word.startswith("{")}
    return sorted(words)


def class_embeddings(seed: int) -> np.ndarray:
    """(num_objects, 2048) float32: sparse (25% non-zero), non-negative, mean about 0.5."""
    rng = np.random.default_rng([seed, 0xC1A55])
    dense = rng.exponential(2.0, size=(len(OBJECT_NAMES), FEATURE_DIM))
    return (dense * (rng.random(dense.shape) < 0.25)).astype(np.float32)


def _class_distribution(rng: np.random.Generator, true_class: int, confuser: int) -> np.ndarray:
    """A detector-like (NUM_CLASSES,) distribution: 0.55-0.85 on the true class, up to 0.1 on a confusable one, the
    rest (at least 0.05) spread over all classes."""
    main = rng.uniform(0.55, 0.85)
    confused = rng.uniform(0.0, 0.1)
    tail = rng.exponential(size=NUM_CLASSES)
    probs = tail * ((1.0 - main - confused) / tail.sum())
    probs[true_class] += main
    probs[confuser] += confused
    return probs.astype(np.float32)


def make_image(seed: int, index: int, embeddings: np.ndarray | None = None) -> dict:
    """Record `index` of the synthetic data for `seed` (see stores.py for the record layout), plus "objects": the
    object-class number (into OBJECT_NAMES) of each region."""
    if embeddings is None:
        embeddings = class_embeddings(seed)
    rng = np.random.default_rng([seed, 1, index])
    width, height = int(rng.integers(400, 641)), int(rng.integers(300, 481))
    num_objects = int(rng.integers(3, 9))
    objects = rng.choice(len(OBJECT_NAMES), size=num_objects, replace=False)

    sizes = rng.uniform(0.1, 0.35, size=(num_objects, 2)) * (width, height)
    corners = rng.uniform(0, 1, size=(num_objects, 2)) * ((width, height) - sizes)
    boxes = np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)  # (N, 4) x1 y1 x2 y2

    scale = rng.uniform(0.7, 1.3, size=(num_objects, 1))
    noise = rng.normal(0.0, 0.5, size=(num_objects, FEATURE_DIM))
    features = np.maximum(embeddings[objects] * scale + noise, 0.0).astype(np.float32)
    # The confusable class of object k is the next object class: a fixed, plausible detector mistake.
    cls_prob = np.stack([_class_distribution(rng, CLASS_INDEX[k], CLASS_INDEX[(k + 1) % len(OBJECT_NAMES)])
                         for k in objects])

    captions = [_caption(rng, objects, boxes) for _ in range(CAPTIONS_PER_IMAGE)]
    return {"image_id": f"synthetic-{seed}-{index}", "image_w": width, "image_h": height, "features": features,
            "boxes": boxes, "cls_prob": cls_prob, "captions": captions, "objects": objects}


def _caption(rng: np.random.Generator, objects: np.ndarray, boxes: np.ndarray) -> str:
    phrases = [noun_phrase(OBJECT_NAMES[k]) for k in objects]
    count = int(rng.integers(2, min(len(objects), MAX_NAMED) + 1))
    named = [int(i) for i in rng.permutation(len(objects))[:count]]
    true_relations = [(a, b, relation) for a in named for b in named if a != b
                      for relation, holds in RELATIONS.items() if holds(boxes[a], boxes[b])]
    parts = [phrases[i] for i in named]
    if true_relations and rng.random() < RELATION_PROB:
        a, b, relation = true_relations[rng.integers(len(true_relations))]
        parts = [RELATION_TEMPLATE.format(phrases[a], phrases[b], relation=relation)]
        parts += [phrases[i] for i in named if i not in (a, b)]
    return parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]


def generate(num_images: int, seed: int = DEFAULT_SEED, first_index: int = 0) -> Iterator[dict]:
    """Synthetic records first_index .. first_index + num_images - 1 for `seed`."""
    embeddings = class_embeddings(seed)
    for index in range(first_index, first_index + num_images):
        yield make_image(seed, index, embeddings)


def write_synthetic(path: str | os.PathLike, num_images: int = DEFAULT_NUM_IMAGES, seed: int = DEFAULT_SEED,
                    progress: bool = False, first_index: int = 0) -> dict:
    """Writes the synthetic data as a native store at `path` (which must not exist); returns its header.

    first_index > 0 gives images a store of the first `first_index` images lacks: held-out data for a model trained
    on that store (the built-in data is the first DEFAULT_NUM_IMAGES)."""
    if num_images < 2:
        raise ValueError(f"num_images must be >= 2 (alignment negatives need another image), got {num_images}")
    if first_index < 0:
        raise ValueError(f"first_index must be >= 0, got {first_index}")
    from tqdm import tqdm

    source = f"synthetic seed={seed}" + (f" images {first_index}.." if first_index else "")
    with StoreWriter(path, source=source) as writer:
        records = generate(num_images, seed, first_index)
        for record in tqdm(records, total=num_images, unit="img", desc="synth", disable=not progress):
            writer.add(record)
    return writer.meta


def default_data_path() -> str:
    """$VILBERT_DATA if set, else $XDG_CACHE_HOME (or ~/.cache)/vilbert/synthetic-v2 (v1's captions named 1-3
    objects; a store written by another version would silently change what the README's runs measured)."""
    if os.environ.get("VILBERT_DATA"):
        return os.environ["VILBERT_DATA"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vilbert", "synthetic-v2")


def ensure_default_data(path: str | os.PathLike | None = None, num_images: int = DEFAULT_NUM_IMAGES,
                        seed: int = DEFAULT_SEED) -> str:
    """Returns the path of the built-in data, generating it first if absent (a few seconds).

    Safe when several ranks call it at once: each writes its own temporary copy and renames it into place; the first
    rename wins and the others discard theirs.
    """
    path = os.fspath(path or default_data_path())
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            write_synthetic(path, num_images, seed)
        except FileExistsError:
            pass  # another process got there first (checked at start) ...
        except OSError:
            # ... or renamed its copy into place while this one was writing; ours was discarded with the error.
            if not os.path.exists(path):
                raise
    NativeStore(path)  # raises a clear error if what is there is not a store
    return path
