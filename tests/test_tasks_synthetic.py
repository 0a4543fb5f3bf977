"""The built-in downstream data (vilbert/tasks/synthetic.py): written in the real layouts, read by the real readers,
and the questions, answers and referred boxes agree with the images."""
import filecmp
import os

import pytest

from vilbert.data import load_tokenizer, open_store
from vilbert.data.synthetic import CLASS_INDEX, OBJECT_NAMES
from vilbert.tasks.referring import ReferringDataset, load_refs
from vilbert.tasks.retrieval import load_captions
from vilbert.tasks.synthetic import (FEATURES_DIR, captions_file, ensure_synthetic_tasks, refs_file, vqa_files,
                                     write_synthetic_tasks)
from vilbert.tasks.vqa import AnswerVocab, VQADataset, load_vqa

NUM_IMAGES = {"train": 12, "val": 4}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_synthetic_tasks(tmp_path_factory.mktemp("tasks") / "data", NUM_IMAGES)


def object_names(record):
    """Each region's object name, read back from its class distribution (most mass on the true class)."""
    return [OBJECT_NAMES[CLASS_INDEX.index(int(c))] for c in record["cls_prob"].argmax(1)]


def test_layout_and_determinism(tasks_dir, tmp_path):
    store = open_store(os.path.join(tasks_dir, FEATURES_DIR))
    assert len(store) == 16
    again = write_synthetic_tasks(tmp_path / "again", NUM_IMAGES)
    for split in ("train", "val"):
        for path in (*vqa_files(tasks_dir, split), captions_file(tasks_dir, split), refs_file(tasks_dir, split)):
            assert filecmp.cmp(path, path.replace(str(tasks_dir), str(again)), shallow=False)
    with pytest.raises(FileExistsError):
        write_synthetic_tasks(tasks_dir)
    with pytest.raises(ValueError, match="num_images"):
        write_synthetic_tasks(tmp_path / "small", {"val": 1})


def test_vqa_answers_are_true(tasks_dir):
    store = open_store(os.path.join(tasks_dir, FEATURES_DIR))
    records = {r["image_id"]: r for r in store}
    examples = load_vqa(*vqa_files(tasks_dir, "train"))
    assert len(examples) == 2 * NUM_IMAGES["train"]
    for ex in examples:
        names = object_names(records[ex.image_id])
        consensus = max(set(ex.answers), key=ex.answers.count)
        assert ex.answers.count(consensus) >= 8
        if ex.question.startswith("is there"):
            asked = ex.question[len("is there "):-len(" in the image ?")].split(" ", 1)[1]
            assert consensus == ("yes" if asked in names else "no")
        elif ex.question.startswith("how many"):
            assert consensus == str(len(names))
        else:
            assert consensus in names
    vocab = AnswerVocab.build(examples)
    dataset = VQADataset(examples, store, load_tokenizer(), vocab, max_text_len=16)
    assert dataset[0]["answer_scores"].max().item() == 1.0


def test_refs_point_at_their_region(tasks_dir):
    store = open_store(os.path.join(tasks_dir, FEATURES_DIR))
    examples = load_refs(refs_file(tasks_dir, "val"))
    dataset = ReferringDataset(examples, store, load_tokenizer(), max_text_len=16)
    for i, ex in enumerate(examples):
        sample = dataset[i]
        best = int(sample["region_iou"].argmax())
        assert sample["region_iou"][best] > 0.7 and sample["region_scores"][best] == 1.0
        names = object_names(store[dataset.image_index[ex.image_id]])
        assert ex.sentence.startswith(f"the {names[best - 1]}")  # region 0 is the IMG token


def test_captions_and_ensure(tasks_dir, tmp_path):
    pairs = load_captions(captions_file(tasks_dir, "val"))
    assert len(pairs) == 2 * NUM_IMAGES["val"]
    path = ensure_synthetic_tasks(tmp_path / "cache" / "tasks", NUM_IMAGES)
    assert ensure_synthetic_tasks(path) == path  # present: not written again
    assert filecmp.cmp(refs_file(path, "train"), refs_file(tasks_dir, "train"), shallow=False)
    assert not [d for d in os.listdir(tmp_path / "cache") if d.startswith(".")]  # no scratch left behind
