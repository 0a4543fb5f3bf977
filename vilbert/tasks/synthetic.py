"""Built-in downstream data: the three tasks on images of the synthetic pretraining world, in the real file layouts.

The images come from `vilbert.data.synthetic` with the same seed (so the same per-class region embeddings the
pretraining data uses) but from indices the pretraining data does not use (from FIRST_INDEX on). Each task is written
in the layout its reader takes for real data, so the synthetic runs exercise the real readers:

    <dir>/features                                   native feature store of the train + val images
    <dir>/v2_OpenEnded_mscoco_{split}_questions.json, <dir>/v2_mscoco_{split}_annotations.json      VQA
    <dir>/captions_{split}.jsonl                     retrieval: {"image_id", "caption"} per line
    <dir>/refs_{split}.json                          referring: [{"ref_id", "image_id", "sentences", "bbox" (x,y,w,h)}]

for split in ("train", "val"). Questions and expressions are templated over the objects and their true relations:
  VQA: "is there a dog in the image ?" (yes / no, half each), "what is to the left of the red cube ?" (an object name,
       asked only where exactly one object stands in that relation), "how many objects are there ?" (3..8);
       10 annotators, 0-2 of whom give a random wrong answer (so the soft scores are not all 1).
  Retrieval: the images' own captions (two per image).
  Referring: "the dog", or "the dog to the left of the red cube" where that names one object; the box is the object's
       box jittered by up to 5% of its size (IoU with its region stays well above 0.5).
Chance levels: VQA yes/no 0.5, object names 1/30; retrieval R@1 = 1/num_images; referring 1/num_objects (3..8).
"""
import json
import os
import shutil
import tempfile

import numpy as np

from vilbert.data.stores import NativeStore, StoreWriter
from vilbert.data.synthetic import (DEFAULT_SEED, OBJECT_NAMES, RELATIONS, class_embeddings, default_data_path,
                                    make_image, noun_phrase)

FIRST_INDEX = 1_000_000  # image indices of the downstream data start here, past any pretraining store's
SPLITS = ("train", "val")
DEFAULT_NUM_IMAGES = {"train": 1500, "val": 200}
FEATURES_DIR = "features"


def vqa_files(directory: str, split: str):
    """(questions path, annotations path) of a split in the VQA 2.0 naming."""
    return (os.path.join(directory, f"v2_OpenEnded_mscoco_{split}_questions.json"),
            os.path.join(directory, f"v2_mscoco_{split}_annotations.json"))


def captions_file(directory: str, split: str) -> str:
    return os.path.join(directory, f"captions_{split}.jsonl")


def refs_file(directory: str, split: str) -> str:
    return os.path.join(directory, f"refs_{split}.json")


def _unique_relations(objects, boxes):
    """[(a, b, relation)] where a is the only object in `relation` to b (so "what is <rel> b ?" has one answer)."""
    found = []
    for b in range(len(objects)):
        for relation, holds in RELATIONS.items():
            subjects = [a for a in range(len(objects)) if a != b and holds(boxes[a], boxes[b])]
            if len(subjects) == 1:
                found.append((subjects[0], b, relation))
    return found


def _questions(rng, image_id, objects, boxes, question_id):
    """Two questions of one image: a yes/no one and an object-name or counting one, as (question, answer) dicts."""
    present = {OBJECT_NAMES[k] for k in objects}
    if rng.random() < 0.5:
        name, answer = OBJECT_NAMES[objects[rng.integers(len(objects))]], "yes"
    else:
        absent = [n for n in OBJECT_NAMES if n not in present]
        name, answer = absent[rng.integers(len(absent))], "no"
    asked = [(f"is there {noun_phrase(name)} in the image ?", answer)]
    unique = _unique_relations(objects, boxes)
    if unique and rng.random() < 0.75:
        a, b, relation = unique[rng.integers(len(unique))]
        asked.append((f"what is {relation} the {OBJECT_NAMES[objects[b]]} ?", OBJECT_NAMES[objects[a]]))
    else:
        asked.append(("how many objects are there ?", str(len(objects))))
    out = []
    for n, (question, answer) in enumerate(asked):
        answers = [answer] * 10
        for j in rng.choice(10, size=int(rng.integers(0, 3)), replace=False):
            answers[j] = ("no" if answer == "yes" else "yes") if answer in ("yes", "no") else \
                OBJECT_NAMES[rng.integers(len(OBJECT_NAMES))]
        out.append(({"question_id": question_id + n, "image_id": image_id, "question": question},
                    {"question_id": question_id + n, "image_id": image_id, "multiple_choice_answer": answer,
                     "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]}))
    return out


def _refs(rng, image_id, objects, boxes, ref_id):
    """Two referring expressions of one image (distinct objects), each with its jittered COCO-style box."""
    relation_of = {a: (b, relation) for a, b, relation in _unique_relations(objects, boxes)}
    refs = []
    for n, k in enumerate(rng.choice(len(objects), size=2, replace=False)):
        sentence = f"the {OBJECT_NAMES[objects[k]]}"
        if k in relation_of and rng.random() < 0.5:
            b, relation = relation_of[k]
            sentence += f" {relation} the {OBJECT_NAMES[objects[b]]}"
        x1, y1, x2, y2 = (float(v) for v in boxes[k])
        w, h = x2 - x1, y2 - y1
        dx1, dy1, dx2, dy2 = rng.uniform(-0.05, 0.05, size=4) * (w, h, w, h)
        x1, y1, x2, y2 = x1 + dx1, y1 + dy1, x2 + dx2, y2 + dy2
        refs.append({"ref_id": ref_id + n, "image_id": image_id, "sentences": [{"sent": sentence}],
                     "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]})
    return refs


def write_synthetic_tasks(directory, num_images=None, seed: int = DEFAULT_SEED) -> str:
    """Writes the built-in downstream data (see the module docstring) into `directory`, which must not exist.

    num_images: {"train": n, "val": m} (default DEFAULT_NUM_IMAGES). Returns `directory`.
    """
    directory = os.fspath(directory)
    if os.path.exists(directory):
        raise FileExistsError(f"{directory!r} already exists; choose a new directory")
    num_images = {**DEFAULT_NUM_IMAGES, **(num_images or {})}
    for split in SPLITS:
        if num_images[split] < 2:
            raise ValueError(f"num_images[{split!r}] must be >= 2 (retrieval needs other images), "
                             f"got {num_images[split]}")
    os.makedirs(directory)
    embeddings = class_embeddings(seed)
    rng = np.random.default_rng([seed, 0x7A5C])
    index = FIRST_INDEX
    with StoreWriter(os.path.join(directory, FEATURES_DIR), source=f"synthetic tasks seed={seed}") as writer:
        for split in SPLITS:
            questions, annotations, captions, refs = [], [], [], []
            for _ in range(num_images[split]):
                record = make_image(seed, index, embeddings)
                writer.add(record)  # the store keeps the record's standard fields (not "objects")
                image_id, objects, boxes = record["image_id"], record["objects"], record["boxes"]
                for question, annotation in _questions(rng, image_id, objects, boxes, question_id=10 * index):
                    questions.append(question)
                    annotations.append(annotation)
                captions.extend({"image_id": image_id, "caption": c} for c in record["captions"])
                refs.extend(_refs(rng, image_id, objects, boxes, ref_id=10 * index))
                index += 1
            q_path, a_path = vqa_files(directory, split)
            _write_json(q_path, {"questions": questions})
            _write_json(a_path, {"annotations": annotations})
            with open(captions_file(directory, split), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(c) + "\n" for c in captions)
            _write_json(refs_file(directory, split), refs)
    return directory


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def default_tasks_path() -> str:
    """Beside the built-in pretraining data: <its directory>/synthetic-tasks-v2 (the retrieval captions are the
    pretraining data's, v2 since its captions changed)."""
    return os.path.join(os.path.dirname(os.path.abspath(default_data_path())), "synthetic-tasks-v2")


def ensure_synthetic_tasks(path=None, num_images=None, seed: int = DEFAULT_SEED) -> str:
    """The path of the built-in downstream data, written first if absent (atomically: a temporary directory is
    renamed into place, so concurrent ranks are safe; the first rename wins)."""
    path = os.path.abspath(os.fspath(path or default_tasks_path()))
    if not os.path.exists(path):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".synthetic-tasks-", dir=parent)
        try:
            write_synthetic_tasks(os.path.join(scratch, "data"), num_images, seed)
            try:
                os.rename(os.path.join(scratch, "data"), path)
            except OSError:
                if not os.path.exists(path):  # lost the race is fine; anything else is an error
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    NativeStore(os.path.join(path, FEATURES_DIR))  # a clear error if what is there is not the data
    return path
