"""Downstream data readers on small files in the real layouts (vilbert/tasks/{common,vqa,retrieval,referring}.py)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from vilbert.data import load_tokenizer
from vilbert.data.stores import StoreWriter, open_store
from vilbert.tasks.common import TaskCollator, encode_regions, encode_text
from vilbert.tasks.referring import ReferringDataset, load_refs, referring_hits
from vilbert.tasks.retrieval import (NUM_CHOICES, RetrievalTrainDataset, load_captions, retrieval_eval_set,
                                     score_all_pairs)
from vilbert.tasks.vqa import AnswerVocab, VQADataset, load_vqa

W, H = 100, 50
BOXES = np.array([[0, 0, 50, 50], [50, 0, 100, 50], [10, 10, 30, 30], [0, 0, 100, 25]], dtype=np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three images ("1", "2", "3") with 4, 3 and 2 regions; image k's features are all k + region index / 4."""
    path = tmp_path_factory.mktemp("store") / "features.lmdb"
    with StoreWriter(path) as writer:
        for k, num_boxes in ((1, 4), (2, 3), (3, 2)):
            features = k + np.arange(num_boxes, dtype=np.float32)[:, None] / 4 + np.zeros((1, 2048), np.float32)
            writer.add({"image_id": str(k), "image_w": W, "image_h": H, "features": features,
                        "boxes": BOXES[:num_boxes]})
    return open_store(path)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_encode_regions_img_token_and_locations(store):
    out = encode_regions(store[0], max_regions=2)  # keeps 2 of the 4 regions, IMG token on top
    assert out["image_lens"].item() == 3
    assert out["image_features"][0, 0].item() == (1.0 + 1.25) / 2  # IMG = mean of the kept regions
    assert out["image_locations"].tolist() == [
        [0, 0, 1, 1, 1],
        [0, 0, 0.5, 1, 0.5],
        [0.5, 0, 1, 1, 0.5],
    ]
    assert out["region_boxes"][0].tolist() == [0, 0, W, H]


def write_vqa(tmp_path):
    questions = {"questions": [
        {"question_id": 10, "image_id": 1, "question": "What is this?"},
        {"question_id": 11, "image_id": 2, "question": "Is it red?"},
        {"question_id": 12, "image_id": 3, "question": "How many?"},
    ]}
    annotations = {"annotations": [
        {"question_id": 10, "image_id": 1, "answers": [{"answer": a} for a in ["dog"] * 7 + ["cat"] * 3]},
        {"question_id": 11, "image_id": 2, "answers": [{"answer": a} for a in ["yes"] * 9 + ["no"]]},
        {"question_id": 12, "image_id": 3, "answers": [{"answer": a} for a in ["two"] * 6 + ["3"] * 4]},
    ]}
    q, a = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "v2_mscoco_val2014_annotations.json"
    q.write_text(json.dumps(questions))
    a.write_text(json.dumps(annotations))
    return str(q), str(a)


def test_vqa_reader_vocab_and_targets(tmp_path, store, tokenizer):
    q, a = write_vqa(tmp_path)
    examples = load_vqa(q, a)
    assert [ex.question_id for ex in examples] == [10, 11, 12]
    assert examples[0].answers == ["dog"] * 7 + ["cat"] * 3
    # Consensus answers dog, yes, 2 ("two" normalized) once each: ties broken alphabetically; "cat" is no consensus.
    vocab = AnswerVocab.build(examples, size=2)
    assert vocab.answers == ["2", "dog"]
    # The most frequent consensus answers come first: "yes" twice beats the others' once.
    again = examples + [dataclasses.replace(examples[1], question_id=13)]
    assert AnswerVocab.build(again, size=2).answers == ["yes", "2"]
    vocab.save(tmp_path / "answers.json")
    assert AnswerVocab.load(tmp_path / "answers.json").answers == ["2", "dog"]

    dataset = VQADataset(examples, store, tokenizer, vocab, max_text_len=8, max_regions=100)
    sample = dataset[2]
    assert sample["answer_scores"].tolist() == pytest.approx([1.0, 0.0])  # "two" x6 -> "2": 1.0
    assert dataset[0]["answer_scores"].tolist() == pytest.approx([0.0, 1.0])
    assert sample["image_lens"].item() == 3 and sample["question_id"].item() == 12
    batch = TaskCollator()([dataset[i] for i in range(3)])
    assert batch["image_features"].shape == (3, 5, 2048)
    assert batch["image_features"][2, 3:].abs().sum() == 0  # padding at the end
    assert batch["answer_scores"].shape == (3, 2)
    assert batch["input_ids"].shape[1] == batch["text_lens"].max()


def test_vocab_entries_written_otherwise_get_their_targets():
    """An answer list as the official one writes it (apostrophes, hyphens) matches the normalized human answers."""
    vocab = AnswerVocab(["don't know", "t-shirt", "Two", "yes"])
    humans = ["dont know"] * 4 + ["T-Shirt"] * 3 + ["two"] * 2 + ["1"]
    assert vocab.soft_targets(humans).tolist() == pytest.approx([1.0, 0.9, 0.6, 0.0])
    with pytest.warns(UserWarning, match="'dont know' \\(as \"don't know\"\\)"):
        merged = AnswerVocab(["don't know", "dont know"])
    assert merged.soft_targets(humans).tolist() == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match="unique"):
        AnswerVocab(["yes", "yes"])


def test_vqa_reader_errors(tmp_path, store, tokenizer):
    q, a = write_vqa(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="'questions'"):
        load_vqa(str(bad))
    examples = load_vqa(q)  # test split: no answers
    assert examples[1].answers == []
    examples[0].image_id = 99
    with pytest.raises(ValueError, match="not in the feature store"):
        VQADataset(examples, store, tokenizer, AnswerVocab(["yes"]))
    few = tmp_path / "few_annotations.json"
    few.write_text(json.dumps({"annotations": json.loads(open(a).read())["annotations"][:2]}))
    with pytest.raises(ValueError, match="no annotation for question_id 12"):
        load_vqa(q, str(few))
    with pytest.raises(ValueError, match="expected a JSON list of answers"):
        AnswerVocab.load(str(few))


def test_encoding_and_collating_errors(store, tokenizer):
    with pytest.raises(ValueError, match="max_text_len must be >= 2"):
        encode_text(tokenizer, "a dog", 1)
    with pytest.raises(ValueError, match="max_regions must be >= 1"):
        encode_regions(store[0], max_regions=0)
    with pytest.raises(ValueError, match="image '7' has no regions"):
        encode_regions({**store[0], "image_id": "7", "features": np.zeros((0, 2048), np.float32),
                        "boxes": np.zeros((0, 4), np.float32)}, max_regions=10)
    with pytest.raises(ValueError, match="empty batch"):
        TaskCollator()([])


def test_retrieval_caption_readers(tmp_path):
    lines = tmp_path / "train.jsonl"
    lines.write_text('{"image_id": 1, "caption": "a dog"}\n\n{"image_id": "2", "sentences": ["a cat", "the cat"]}\n')
    assert load_captions(str(lines)) == [(1, "a dog"), (2, "a cat"), (2, "the cat")]
    # vilbert-multi-task's files: COCO lines name the image by "id", Flickr30k lines by "img_path" (they also carry
    # an "id" that is not the image's).
    mt = tmp_path / "all_data_final_test_set0_2014.jsonline"
    mt.write_text('{"sentences": ["a dog", "one dog"], "id": 7, "img_path": "COCO_val2014_000000000007.jpg"}\n'
                  '{"sentences": ["a cat"], "img_path": "1007.jpg"}\n'
                  '{"sentences": ["a cow"], "id": 0, "img_path": "flickr30k_images/1000092795.jpg"}\n'
                  '{"sentences": ["a hen"], "img_path": "farm/hen_2.jpg"}\n')  # no id: the stem, a number or not
    assert load_captions(str(mt)) == [(7, "a dog"), (7, "one dog"), (1007, "a cat"), (1000092795, "a cow"),
                                      ("hen_2", "a hen")]
    mt.write_text('{"sentences": ["a dog"], "url": "x"}\n')
    with pytest.raises(ValueError, match=":1: expected an image id"):
        load_captions(str(mt))
    obj = tmp_path / "captions.json"
    obj.write_text(json.dumps({"1": ["a dog", "one dog"], "3": "a bird"}))
    pairs = load_captions(str(obj))
    assert pairs == [(1, "a dog"), (1, "one dog"), (3, "a bird")]
    image_ids, captions, caption_image = retrieval_eval_set(pairs)
    assert image_ids == [1, 3] and caption_image.tolist() == [0, 0, 1]
    coco = {"annotations": [{"image_id": 5, "caption": "a cow"}, {"image_id": 5, "caption": "cows"}]}
    obj.write_text(json.dumps(coco))
    assert load_captions(str(obj)) == [(5, "a cow"), (5, "cows")]  # COCO's captions file
    obj.write_text(json.dumps(["a dog"]))
    with pytest.raises(ValueError, match="JSON object"):
        load_captions(str(obj))
    mt.write_text("\n")
    with pytest.raises(ValueError, match="no captions found"):
        load_captions(str(mt))
    karpathy = {"images": [{"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": "a cow"}]}],
                "dataset": "flickr30k"}
    obj.write_text(json.dumps(karpathy))
    with pytest.raises(ValueError, match=r"value of 'images' is not a caption.*Karpathy"):
        load_captions(str(obj))


def test_retrieval_multiple_choice(store, tokenizer):
    pairs = [(1, "a dog"), (2, "a cat"), (3, "a bird"), (1, "one dog")]
    dataset = RetrievalTrainDataset(pairs, store, tokenizer, seed=3, hard_negatives={1: [3, 99, 1], 4: [1, 2]},
                                    max_text_len=8)
    assert dataset.hard_negatives == {1: [3]}  # 99 and 4 have no caption, 1 is the image itself
    choices = dataset[0]
    assert len(choices) == NUM_CHOICES
    image = [int(c["image_features"][1, 0].item()) for c in choices]  # which image each choice shows
    text = [tokenizer.decode(c["input_ids"]) for c in choices]
    assert image[0] == 1 and text[0] == "a dog"  # the positive
    assert image[1] == 1 and text[1] in ("a cat", "a bird")  # the image with another image's caption
    assert image[2] in (2, 3) and text[2] == "a dog"  # another image with the caption
    assert image[3] == 1 and text[3] == "a bird"  # the image with its hard negative's caption
    again = dataset[0]
    # Seeded by (seed, epoch, i): the same item again is the same choices.
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(choices, again))
    batch = TaskCollator()([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 2 * NUM_CHOICES
    with pytest.raises(ValueError, match=r"1 caption image_ids are not in the feature store, e.g. \[9\]"):
        RetrievalTrainDataset(pairs + [(9, "a cow")], store, tokenizer)
    with pytest.raises(ValueError, match="captions of at least 2 images"):
        RetrievalTrainDataset([(1, "a dog"), (1, "one dog")], store, tokenizer)


def test_hard_negative_pools_from_the_official_pickle_and_json(tmp_path):
    import pickle
    from vilbert.tasks.retrieval import load_hard_negatives
    official = {"train_image_list": [11, 12, 13], "train_hard_pool": np.array([[0, 2, 1], [1, 0, 2], [2, 1, 0]])}
    with open(tmp_path / "hard_negative.pkl", "wb") as f:
        pickle.dump(official, f)
    # Row r holds indices into train_image_list of image r's nearest images; the first is skipped (the official).
    assert load_hard_negatives(str(tmp_path / "hard_negative.pkl")) == {11: [13, 12], 12: [11, 13], 13: [12, 11]}
    (tmp_path / "pools.json").write_text(json.dumps({"11": [12, "13"]}))
    assert load_hard_negatives(str(tmp_path / "pools.json")) == {11: [12, 13]}
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ValueError, match="train_image_list and train_hard_pool"):
        load_hard_negatives(str(tmp_path / "bad.pkl"))
    (tmp_path / "pools.json").write_text(json.dumps({"11": 12}))
    with pytest.raises(ValueError, match=r"expected a JSON object \{image_id: \[image_ids\]\}"):
        load_hard_negatives(str(tmp_path / "pools.json"))
    (tmp_path / "pools.jsonl").write_text('{"11": [12]}\n')  # not a pickle either
    with pytest.raises(ValueError, match="hard_negative.pkl"):
        load_hard_negatives(str(tmp_path / "pools.jsonl"))


def test_item_generators_take_every_seed_and_differ_per_item():
    from vilbert.tasks.common import item_generator

    def draw(seed, epoch, index):
        return torch.rand(4, generator=item_generator(seed, epoch, index))
    assert torch.equal(draw(5, 1, 2), draw(5, 1, 2))
    draw(2**32 - 2, 10**6, 10**7)  # the largest seed train/ accepts (a linear combination overflowed 64 bits)
    # items one epoch apart, seeds one apart: their own streams
    assert not torch.equal(draw(0, 0, 1_000_003), draw(0, 1, 0))
    assert not torch.equal(draw(1, 0, 0), draw(0, 1_000_003, 0))
    # and the plain sum's neighbours: the next item, epoch or seed
    assert len({tuple(draw(*key).tolist()) for key in [(0, 0, 1), (0, 1, 0), (1, 0, 0)]}) == 3


def test_image_index_reads_ids_only(store):
    """index_images asks a store for its ids (`image_ids()`), not for every record with its features."""
    from vilbert.tasks.common import index_images

    class IdsOnly(list):
        def image_ids(self):
            return ["10", "x", "12"]

        def __getitem__(self, i):
            raise AssertionError("a record was decoded")
    assert index_images(IdsOnly([None] * 3)) == {10: 0, "x": 1, 12: 2}
    assert index_images(store) == {int(store[i]["image_id"]): i for i in range(len(store))}


def test_score_all_pairs_matches_per_pair_scores(store, tokenizer):
    def score_fn(batch):  # a stand-in scorer that depends on both the text and the image
        return batch["image_features"][:, 1, 0] * batch["input_ids"].sum(1) + batch["image_lens"]

    captions = ["a dog", "a small cat", "bird"]
    scores = score_all_pairs(score_fn, store, tokenizer, [1, 2, 3], captions, image_chunk=2, max_text_len=8)
    for i, image_id in enumerate([1, 2, 3]):
        for c, caption in enumerate(captions):
            ids = torch.tensor(tokenizer.encode(caption, max_len=8))
            assert scores[i, c].item() == pytest.approx(image_id * ids.sum().item() + (5 - i))


def write_refs(tmp_path):
    refs = [
        # bbox [x, y, w, h] = region 2's box (10, 10, 30, 30) exactly
        {"ref_id": 7, "image_id": 1, "sentences": [{"sent": "the small square"}, "middle thing"],
         "bbox": [10, 10, 20, 20]},
        # (0, 0, 50, 40): IoU 0.8 with region 0 (0, 0, 50, 50), 0.2 with region 2
        {"ref_id": 8, "image_id": 2, "sentences": ["left half"], "bbox": [0, 0, 50, 40]},
    ]
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(refs))
    return str(path)


def test_referring_reader_and_targets(tmp_path, store, tokenizer):
    examples = load_refs(write_refs(tmp_path))
    assert [(ex.ref_id, ex.sentence) for ex in examples] == [(7, "the small square"), (7, "middle thing"),
                                                             (8, "left half")]
    assert examples[0].gt_box == [10, 10, 30, 30]
    dataset = ReferringDataset(examples, store, tokenizer, max_text_len=8)
    sample = dataset[0]
    assert sample["region_scores"].tolist() == [0, 0, 0, 1, 0]  # IMG token, then regions 0..3
    assert sample["region_iou"][3].item() == pytest.approx(1.0)
    sample = dataset[2]  # image 2 has 3 regions: 0 (IoU 0.8), 1 (0), 2 ((20*20)/2000 = 0.2)
    assert sample["region_iou"].tolist() == pytest.approx([0, 0.8, 0.0, 0.2])
    assert sample["region_scores"].tolist() == [0, 1, 0, 0]

    batch = TaskCollator()([dataset[0], dataset[2]])
    logits = torch.tensor([[9.0, 0.0, 0.0, 1.0, 0.0],  # IMG token scored highest: ignored, region 2 picked: hit
                           [0.0, 0.0, 0.0, 0.0, 9.0]])  # padding scored highest: ignored; a tie, picks region 0: hit
    assert referring_hits(logits, batch).tolist() == [1.0, 1.0]
    logits[1, 3] = 5.0  # region 2 (IoU 0.2): miss
    assert referring_hits(logits, batch).tolist() == [1.0, 0.0]
    batch["region_iou"][1, 3] = 0.5  # IoU 0.5 exactly: a hit (>= 0.5, as the official evaluation)
    assert referring_hits(logits, batch).tolist() == [1.0, 1.0]
    # The same refs as JSON lines, blank lines skipped.
    lines = tmp_path / "refs.jsonl"
    lines.write_text("\n".join(json.dumps(ref) for ref in json.loads((tmp_path / "refs.json").read_text())) + "\n\n")
    assert load_refs(str(lines)) == examples


def test_referring_reader_errors(tmp_path, store, tokenizer):
    listless = tmp_path / "refs.json"
    listless.write_text(json.dumps({"refs": []}))
    with pytest.raises(ValueError, match="expected a JSON list of ref records"):
        load_refs(str(listless))
    listless.write_text(json.dumps([{"ref_id": 1, "image_id": 9, "sentences": ["x"], "bbox": [0, 0, 5, 5]}]))
    with pytest.raises(ValueError, match=r"1 ref image_ids are not in the feature store, e.g. \[9\]"):
        ReferringDataset(load_refs(str(listless)), store, tokenizer)
    path = tmp_path / "refs.jsonl"
    path.write_text('{"ref_id": 1, "image_id": 1, "sentences": ["x"]}\n')
    with pytest.raises(ValueError, match="bbox"):
        load_refs(str(path))
    path.write_text('{"ref_id": 1, "image_id": 1, "sentences": ["x"], "bbox": [5, 5, 1, -2]}\n')
    with pytest.raises(ValueError, match="negative width or height"):
        load_refs(str(path))
