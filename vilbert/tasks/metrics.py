"""The downstream metrics the paper reports: VQA accuracy, retrieval recall at K, referring-expression accuracy.

Plain functions on tensors (or lists for answer strings), no model code, so evaluation scripts and tests can use them
on any scores. Legend: N questions / expressions, I images, C captions, R regions.
"""
import re
from collections import Counter
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

# ---------------------------------------------------------------------------------------------------------- VQA

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# A period or comma is kept only between two digits ("2.5", "1,000" -> "1000" below); other punctuation separates words.
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`?!*#%^&$~|:]")


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalization: lower case, punctuation, number words to digits, no articles.

    Follows the official evaluation's rules in spirit ("Two dogs." -> "2 dogs", "the red one" -> "red 1"); applied to
    both the predicted and the human answers, so the two compare as strings.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # "1,000" -> "1000"
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", "", text)  # periods go unless inside a number
    text = text.replace(",", " ").replace("'", "")  # "dog's" -> "dogs"; "dont", "isnt" compare equal
    text = _PUNCTUATION.sub(" ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_answer_score(count: int, num_humans: int = 10) -> float:
    """Credit for an answer that `count` of `num_humans` annotators gave: min(#humans / 3, 1), averaged leave-one-out.

    The official evaluation averages min(matches / 3, 1) over the `num_humans` subsets that leave one annotator out:
    (num_humans - count) subsets still hold all `count` matches, `count` subsets hold count - 1. For 10 annotators this
    gives 0, 0.3, 0.6, 0.9, 1.0 for counts 0..4+, the soft targets the VQA head is trained on.
    """
    if not 0 <= count <= num_humans:
        raise ValueError(f"count must be in [0, num_humans={num_humans}], got {count}")
    if num_humans == 1:
        return min(count / 3.0, 1.0)  # nobody to leave out
    keep_all = (num_humans - count) * min(count / 3.0, 1.0)
    lose_one = count * min((count - 1) / 3.0, 1.0)
    return (keep_all + lose_one) / num_humans


def vqa_soft_scores(human_answers: Sequence[str]) -> Dict[str, float]:
    """{normalized answer: soft score} for one question's human answers (usually 10); score-0 answers are absent."""
    counts = Counter(normalize_answer(a) for a in human_answers)
    return {answer: vqa_answer_score(c, len(human_answers)) for answer, c in counts.items()}


def vqa_accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """Mean VQA accuracy of predicted answer strings against each question's human answers, in [0, 1].

    predictions: N answers; human_answers: N lists of the annotators' answers. Both sides are normalized.
    """
    if len(predictions) != len(human_answers):
        raise ValueError(f"predictions ({len(predictions)}) and human_answers ({len(human_answers)}) differ in length")
    if len(predictions) == 0:
        raise ValueError("vqa_accuracy needs at least one question, got none")
    total = 0.0
    for predicted, answers in zip(predictions, human_answers):
        total += vqa_soft_scores(answers).get(normalize_answer(predicted), 0.0)
    return total / len(predictions)


def vqa_score_from_logits(logits: torch.Tensor, answer_scores: torch.Tensor) -> torch.Tensor:
    """Per-question VQA accuracy of the argmax answer, read from the soft-score targets: (N, A), (N, A) -> (N,).

    Equals `vqa_accuracy` when the targets come from `vqa_soft_scores` and the answer is in the vocabulary
    (an out-of-vocabulary human answer cannot be predicted, so it only lowers the ceiling).
    """
    if logits.shape != answer_scores.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and answer_scores {tuple(answer_scores.shape)} must both be "
                         "(N, A)")
    best = logits.argmax(dim=1, keepdim=True)  # (N, 1)
    return answer_scores.gather(1, best).squeeze(1)


# ---------------------------------------------------------------------------------------------------- retrieval

def _rank_of_truth(scores: torch.Tensor, truth_col: torch.Tensor) -> torch.Tensor:
    """(Q, K) scores, (Q,) index of each query's true candidate -> (Q,) 0-based rank of the truth.

    Ties count against the truth (rank = number of other candidates scoring >= it), so a constant scorer gets no credit.
    """
    true_score = scores.gather(1, truth_col[:, None])  # (Q, 1)
    return (scores >= true_score).sum(dim=1) - 1


def retrieval_recall(scores: torch.Tensor, caption_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> Dict[str, Dict[int, float]]:
    """Recall@K both ways from an image x caption score matrix.

    scores: (I, C), higher = better match; caption_image: (C,) int, the index of each caption's image in [0, I).
    Returns {"image_retrieval": {k: R@k}, "caption_retrieval": {k: R@k}} as fractions in [0, 1]:
      - image retrieval (text -> image, what the paper reports as "image retrieval"): each caption ranks the I images;
        a hit when its image is in the top k.
      - caption retrieval (image -> text): each image that has at least one caption ranks the C captions; a hit when
        any of its captions is in the top k.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (num_images, num_captions), got shape {tuple(scores.shape)}")
    num_images, num_captions = scores.shape
    caption_image = torch.as_tensor(caption_image, device=scores.device).long()
    if caption_image.shape != (num_captions,):
        raise ValueError(f"caption_image must be ({num_captions},) to match scores {tuple(scores.shape)}, "
                         f"got {tuple(caption_image.shape)}")
    if num_captions == 0 or caption_image.min() < 0 or caption_image.max() >= num_images:
        raise ValueError(f"caption_image must hold image indices in [0, {num_images}) for at least one caption")
    if scores.isnan().any():  # NaN compares false with everything: it would rank first and count as a hit
        raise ValueError(f"scores hold {int(scores.isnan().sum())} NaN of {scores.numel()}: a diverged model or an "
                         "overflow, not a ranking")
    scores = scores.double()

    image_rank = _rank_of_truth(scores.t(), caption_image)  # (C,)

    # An image's rank is the best rank among its captions: the number of captions scoring above its best caption.
    is_own = caption_image[None, :] == torch.arange(num_images, device=scores.device)[:, None]  # (I, C)
    best_own = scores.masked_fill(~is_own, float("-inf")).max(dim=1).values  # (I,)
    has_caption = is_own.any(dim=1)
    # Ties with other images' captions count against the image; its own captions never outrank it.
    caption_rank = ((scores >= best_own[:, None]) & ~is_own).sum(dim=1)[has_caption]  # (I',)

    return {
        "image_retrieval": {k: (image_rank < k).double().mean().item() for k in ks},
        "caption_retrieval": {k: (caption_rank < k).double().mean().item() for k in ks},
    }


# ----------------------------------------------------------------------------------------- referring expressions

def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over union of (x1, y1, x2, y2) boxes: (N, 4), (M, 4) -> (N, M) in float64.

    Coordinates are continuous (a box's area is (x2 - x1) * (y2 - y1), no +1). A pair whose union is empty (two
    degenerate boxes) gets IoU 0, never NaN.
    """
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"{name} must be (num_boxes, 4) as (x1, y1, x2, y2), got shape {tuple(b.shape)}")
    b1, b2 = boxes1.double(), boxes2.double()
    area1 = (b1[:, 2] - b1[:, 0]).clamp(min=0) * (b1[:, 3] - b1[:, 1]).clamp(min=0)  # (N,)
    area2 = (b2[:, 2] - b2[:, 0]).clamp(min=0) * (b2[:, 3] - b2[:, 1]).clamp(min=0)  # (M,)
    top_left = torch.maximum(b1[:, None, :2], b2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.minimum(b1[:, None, 2:], b2[None, :, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def referring_accuracy(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of expressions whose predicted box overlaps the ground truth at IoU >= threshold: (N, 4), (N, 4)."""
    if pred_boxes.shape != gt_boxes.shape or pred_boxes.dim() != 2 or pred_boxes.shape[0] == 0:
        raise ValueError(f"pred_boxes {tuple(pred_boxes.shape)} and gt_boxes {tuple(gt_boxes.shape)} must both be "
                         f"(N, 4) with N >= 1")
    iou = box_iou(pred_boxes, gt_boxes).diagonal()  # (N,): each prediction against its own ground truth
    return (iou >= threshold).double().mean().item()


def referring_targets(region_boxes: torch.Tensor, gt_box: torch.Tensor, threshold: float = 0.5
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-region targets for one expression: (R, 4) region boxes, (4,) ground truth -> (iou (R,), target (R,) float).

    target is 1.0 where the region overlaps the ground truth at IoU >= threshold, the paper's BCE target.
    """
    iou = box_iou(region_boxes, gt_box.reshape(1, 4)).squeeze(1)  # (R,)
    return iou, (iou >= threshold).float()


def summarize_recall(recall: Mapping[str, Mapping[int, float]]) -> List[str]:
    """Readable lines ("image_retrieval R@1 58.20 R@5 ...") in percent, for logs and evaluation output."""
    return [f"{direction} " + " ".join(f"R@{k} {100 * v:.2f}" for k, v in by_k.items())
            for direction, by_k in recall.items()]
