"""Downstream metrics against hand-computed cases (vilbert/tasks/metrics.py; task_hits of vilbert/tasks/models.py)."""
import types

import pytest
import torch

from vilbert.tasks.metrics import (box_iou, normalize_answer, referring_accuracy, referring_targets,
                                   retrieval_recall, vqa_accuracy, vqa_answer_score, vqa_score_from_logits,
                                   vqa_soft_scores)
from vilbert.tasks.models import evaluate_batches, task_hits


# ---------------------------------------------------------------------------------------------------------- VQA

def test_vqa_answer_score_ten_humans():
    # Leave-one-out by hand, count 3: 7 subsets keep 3 matches (credit 1), 3 keep 2 (credit 2/3) -> (7 + 2) / 10.
    expected = [0.0, 0.3, 0.6, 0.9] + [1.0] * 7
    got = [vqa_answer_score(c) for c in range(11)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_vqa_answer_score_single_human_is_plain_formula():
    assert vqa_answer_score(1, num_humans=1) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="count"):
        vqa_answer_score(11)


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"), ("Two dogs.", "2 dogs"), ("the red one", "red 1"), ("1,000", "1000"), ("2.5", "2.5"),
    ("yes/no", "yes no"), ("don't", "dont"), ("  A  cat ", "cat"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_soft_scores_and_accuracy():
    humans_1 = ["yes"] * 3 + ["no"] * 7
    humans_2 = ["2"] + ["three"] * 9
    assert vqa_soft_scores(humans_1) == pytest.approx({"yes": 0.9, "no": 1.0})
    assert vqa_soft_scores(humans_2) == pytest.approx({"2": 0.3, "3": 1.0})
    # "Yes" -> 0.9, "two" -> "2" -> 0.3, "cat" -> 0.
    assert vqa_accuracy(["Yes", "two", "cat"], [humans_1, humans_2, humans_1]) == pytest.approx((0.9 + 0.3) / 3)
    with pytest.raises(ValueError, match="differ in length"):
        vqa_accuracy(["yes"], [])
    with pytest.raises(ValueError, match="at least one question"):
        vqa_accuracy([], [])
    with pytest.raises(TypeError, match="answer must be a str"):
        normalize_answer(2)


def test_vqa_score_from_logits():
    targets = torch.tensor([[0.0, 0.3, 1.0], [0.9, 0.0, 0.0]])
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 1.0, 0.0]])  # argmax 1 (score 0.3), argmax 0 (score 0.9)
    assert vqa_score_from_logits(logits, targets).tolist() == pytest.approx([0.3, 0.9])
    with pytest.raises(ValueError, match=r"logits \(2, 2\) and answer_scores \(2, 3\)"):
        vqa_score_from_logits(logits[:, :2], targets)


# ---------------------------------------------------------------------------------------------------- retrieval

def test_retrieval_recall_hand_case():
    # 4 images (image 3 has no caption), 4 captions; captions 0,1 belong to image 0, caption 2 to 1, caption 3 to 2.
    scores = torch.tensor([
        [0.9, 0.1, 0.5, 0.2],
        [0.8, 0.7, 0.6, 0.3],
        [0.1, 0.2, 0.4, 0.1],
        [0.0, 0.0, 0.0, 0.0],
    ])
    caption_image = torch.tensor([0, 0, 1, 2])
    recall = retrieval_recall(scores, caption_image, ks=(1, 2, 3))
    # Image retrieval ranks per caption: c0 -> 0, c1 -> 2 (0.7, 0.2 above 0.1), c2 -> 0, c3 -> 2 (0.3, 0.2 above 0.1).
    assert recall["image_retrieval"] == pytest.approx({1: 0.5, 2: 0.5, 3: 1.0})
    # Caption retrieval ranks per image: i0 -> 0 (best own 0.9); i1 -> 2 (0.8, 0.7 above 0.6);
    # i2 -> 3 (0.2, 0.4 above 0.1, and c0 ties at 0.1, which counts against it). Image 3 has no caption: not counted.
    assert recall["caption_retrieval"] == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 2 / 3})


def test_retrieval_recall_constant_scores_get_no_credit():
    # Every tie counts against the truth: rank 4 of 5 images, rank 8 of 10 captions (the 8 of other images).
    recall = retrieval_recall(torch.zeros(5, 10), torch.arange(10) % 5, ks=(1, 4, 5, 9))
    assert recall["image_retrieval"] == {1: 0.0, 4: 0.0, 5: 1.0, 9: 1.0}
    assert recall["caption_retrieval"] == {1: 0.0, 4: 0.0, 5: 0.0, 9: 1.0}


def test_retrieval_recall_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    num_images, num_captions = 7, 23
    scores = torch.randn(num_images, num_captions, generator=g, dtype=torch.float64)
    caption_image = torch.randint(0, num_images, (num_captions,), generator=g)
    recall = retrieval_recall(scores, caption_image, ks=(1, 3, 5))
    for k in (1, 3, 5):
        hits = sum(int(caption_image[c]) in scores[:, c].topk(k).indices.tolist() for c in range(num_captions))
        assert recall["image_retrieval"][k] == pytest.approx(hits / num_captions)
        images = caption_image.unique().tolist()
        hits = sum(any(caption_image[c] == i for c in scores[i].topk(k).indices.tolist()) for i in images)
        assert recall["caption_retrieval"][k] == pytest.approx(hits / len(images))


def test_retrieval_recall_bad_input():
    with pytest.raises(ValueError, match="caption_image"):
        retrieval_recall(torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="image indices"):
        retrieval_recall(torch.zeros(3, 2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="scores"):
        retrieval_recall(torch.zeros(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):  # would rank first: every caption a hit
        retrieval_recall(torch.full((3, 3), float("nan")), torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------------------- referring expressions

def test_box_iou_hand_cases():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([
        [1.0, 1.0, 3.0, 3.0],  # intersection 1, union 4 + 4 - 1 = 7
        [0.0, 0.0, 2.0, 1.0],  # inside: 2 / 4
        [5.0, 5.0, 6.0, 6.0],  # disjoint
        [0.0, 0.0, 2.0, 2.0],  # identical
        [1.0, 1.0, 1.0, 1.0],  # degenerate point inside: 0 / 4
    ])
    assert box_iou(a, b).squeeze(0).tolist() == pytest.approx([1 / 7, 0.5, 0.0, 1.0, 0.0])
    point = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert box_iou(point, point).item() == 0.0  # empty union: 0, not NaN


def test_box_iou_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    corners = torch.rand(5, 2, 2, generator=g, dtype=torch.float64) * 10
    boxes1 = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)  # (5, 4)
    corners = torch.rand(3, 2, 2, generator=g, dtype=torch.float64) * 10
    boxes2 = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)  # (3, 4)
    iou = box_iou(boxes1, boxes2)
    for i, (ax1, ay1, ax2, ay2) in enumerate(boxes1.tolist()):
        for j, (bx1, by1, bx2, by2) in enumerate(boxes2.tolist()):
            inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
            union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
            assert iou[i, j].item() == pytest.approx(inter / union, rel=1e-12)
    with pytest.raises(ValueError, match="boxes2"):
        box_iou(boxes1, boxes2[:, :3])


def test_referring_accuracy_and_targets():
    gt = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    pred = torch.tensor([[0.0, 0.0, 2.0, 1.0],  # IoU exactly 0.5: a hit
                         [1.0, 1.0, 3.0, 3.0],  # 1/7: a miss
                         [0.0, 0.0, 1.0, 1.0]])  # identical: a hit
    assert referring_accuracy(pred, gt) == pytest.approx(2 / 3)
    iou, target = referring_targets(pred, gt[0])
    assert iou.tolist() == pytest.approx([0.5, 1 / 7, 0.25])
    assert target.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="pred_boxes"):
        referring_accuracy(pred[:2], gt)


# ------------------------------------------------------------------------------------- per-batch training metrics

def test_task_hits_per_task():
    """The metric finetune.py logs per training batch: the VQA score of the argmax answer, the referring hit of the
    best real region (neither the IMG token nor padding), whether the positive (choice 0) of a retrieval group won."""
    vqa = task_hits("vqa", torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 0.0]]),
                    {"answer_scores": torch.tensor([[0.0, 0.6, 1.0], [0.3, 1.0, 0.0]])})
    assert vqa.tolist() == pytest.approx([0.6, 0.3])
    # Sample 0: region 2 scores highest among the real ones (IoU 0.6); sample 1: the IMG token and the padded region
    # score highest, the best real region is 1 (IoU 0.2).
    referring = task_hits("referring", torch.tensor([[0.0, 1.0, 3.0, 9.0], [9.0, 2.0, 1.0, 8.0]]),
                          {"image_lens": torch.tensor([3, 3]),
                           "region_iou": torch.tensor([[1.0, 0.1, 0.6, 0.9], [1.0, 0.2, 0.7, 0.9]])})
    assert referring.tolist() == [1.0, 0.0]
    retrieval = task_hits("retrieval", torch.tensor([3.0, 1.0, 2.0, 0.0, 1.0, 0.5, 4.0, 2.0]), {})
    assert retrieval.tolist() == [1.0, 0.0]  # two groups of NUM_CHOICES: the positive wins the first only
    with pytest.raises(ValueError, match="task"):
        task_hits("captioning", torch.zeros(2, 2), {})


def test_evaluate_batches_averages_over_samples():
    """The accuracy over a loader: the hits of every sample over the sample count, whatever the batches' sizes (3 and
    2 here) and text length (4); the model runs in eval mode and comes back in train mode."""
    class AnswerFromText(torch.nn.Module):  # answers the id of its second token; notes whether dropout was on
        def forward(self, input_ids, **inputs):
            self.modes = getattr(self, "modes", []) + [self.training]
            return types.SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids[:, 1], 3).float())

    def batch(answers, scores):
        inputs = {key: torch.zeros(len(answers), 4) for key in ("token_type_ids", "text_lens", "image_features",
                                                                 "image_locations", "image_lens")}
        ids = torch.zeros(len(answers), 4, dtype=torch.long)
        ids[:, 1] = torch.tensor(answers)
        return {**inputs, "input_ids": ids, "answer_scores": torch.tensor(scores)}

    loader = [batch([0, 1, 2], [[1.0, 0, 0], [0, 0.3, 1.0], [0, 0, 0.6]]), batch([2, 0], [[1.0, 0, 0], [0.9, 0, 0]])]
    model = AnswerFromText()
    assert evaluate_batches("vqa", model, loader, "cpu") == {"vqa_accuracy": pytest.approx((1.0 + 0.3 + 0.6 + 0.9) / 5),
                                                             "num_samples": 5}
    assert model.modes == [False, False] and model.training
    with pytest.raises(ValueError, match="no samples"):
        evaluate_batches("vqa", model, [], "cpu")
