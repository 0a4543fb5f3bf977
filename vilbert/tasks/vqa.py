"""VQA: questions + human answers in the VQA 2.0 JSON layout, an answer vocabulary, soft-score targets.

Files users have (VQA 2.0):
  v2_OpenEnded_mscoco_<split>_questions.json: {"questions": [{"question_id", "image_id", "question"}, ...]}
  v2_mscoco_<split>_annotations.json: {"annotations": [{"question_id", "image_id", "answers": [{"answer", ...}] x 10,
                                                         "multiple_choice_answer", ...}, ...]}
The test split has questions and no annotations; its examples carry no answers.
The head is a classifier over the answer vocabulary (3129 answers in the official VQA 2.0 setup: pass that list to
`AnswerVocab.load`, or let `AnswerVocab.build` take the most frequent consensus answers of the train split), trained
with BCE against the soft scores min(#humans / 3, 1).
"""
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .common import encode_regions, encode_text, index_images
from .metrics import normalize_answer, vqa_soft_scores

VQA2_NUM_ANSWERS = 3129


@dataclass
class VQAExample:
    question_id: int
    image_id: int
    question: str
    answers: List[str] = field(default_factory=list)  # the annotators' answers; empty for the test split


def _read_json_list(path: str, key: str) -> list:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"{path}: expected a JSON object with a '{key}' list (the VQA 2.0 layout), "
                         f"got {type(data).__name__} with keys {sorted(data)[:5] if isinstance(data, dict) else '-'}")
    return data[key]


def load_vqa(questions_path: str, annotations_path: Optional[str] = None) -> List[VQAExample]:
    """Read a VQA 2.0 questions file and (for train/val) its annotations file into examples, in question order."""
    questions = _read_json_list(questions_path, "questions")
    answers_by_question: Dict[int, List[str]] = {}
    if annotations_path is not None:
        for ann in _read_json_list(annotations_path, "annotations"):
            answers_by_question[ann["question_id"]] = [a["answer"] for a in ann["answers"]]
    examples = []
    for q in questions:
        answers = answers_by_question.get(q["question_id"])
        if annotations_path is not None and answers is None:
            raise ValueError(f"{annotations_path}: no annotation for question_id {q['question_id']} "
                             f"of {questions_path}")
        examples.append(VQAExample(q["question_id"], q["image_id"], q["question"], answers or []))
    return examples


class AnswerVocab:
    """Answer string <-> class index of the VQA head.

    `answers` keeps the entries as given (the head's classes, and the strings predictions are reported as); lookups go
    through `normalize_answer`, the normalization the human answers get, so an entry written another way ("don't
    know", "T-shirt", as in the official answer list) still receives its targets. Entries that normalize alike share
    the first one's class (with a warning: the later ones never get a target).
    """

    def __init__(self, answers: Sequence[str]):
        self.answers = list(answers)
        if len(set(self.answers)) != len(self.answers):
            raise ValueError("answers must be unique")
        self.index: Dict[str, int] = {}
        merged = []
        for i, answer in enumerate(self.answers):
            key = normalize_answer(answer)
            if key in self.index:
                merged.append(f"{answer!r} (as {self.answers[self.index[key]]!r})")
            else:
                self.index[key] = i
        if merged:
            warnings.warn(f"{len(merged)} answers normalize like an earlier one and will never be a target: "
                          f"{', '.join(merged[:5])}")

    def __len__(self) -> int:
        return len(self.answers)

    @classmethod
    def build(cls, examples: Sequence[VQAExample], size: int = VQA2_NUM_ANSWERS) -> "AnswerVocab":
        """The `size` most frequent consensus answers (the most common of each question's human answers).

        Ties in frequency are broken alphabetically so the vocabulary is the same on every machine.
        """
        consensus = Counter()
        for ex in examples:
            if ex.answers:
                counts = Counter(normalize_answer(a) for a in ex.answers)
                consensus[max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]] += 1
        ranked = sorted(consensus.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([a for a, _ in ranked[:size]])

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.answers, f)

    @classmethod
    def load(cls, path: str) -> "AnswerVocab":
        with open(path, encoding="utf-8") as f:
            answers = json.load(f)
        if not isinstance(answers, list):
            raise ValueError(f"{path}: expected a JSON list of answers, got {type(answers).__name__}")
        return cls(answers)

    def soft_targets(self, human_answers: Sequence[str]) -> torch.Tensor:
        """(A,) float32 soft scores over the vocabulary; answers outside it are dropped."""
        target = torch.zeros(len(self.answers))
        for answer, score in vqa_soft_scores(human_answers).items():
            if answer in self.index:
                target[self.index[answer]] = score
        return target


class VQADataset(torch.utils.data.Dataset):
    """One question with its image's regions: the model inputs plus `answer_scores` (A,) and `question_id`.

    Official downstream lengths: 23 question tokens, 100 regions (+ the IMG token).
    """

    def __init__(self, examples: Sequence[VQAExample], store, tokenizer, answer_vocab: AnswerVocab,
                 max_text_len: int = 23, max_regions: int = 100):
        self.examples = list(examples)
        self.store = store
        self.tokenizer = tokenizer
        self.answer_vocab = answer_vocab
        self.max_text_len = max_text_len
        self.max_regions = max_regions
        self.image_index = index_images(store)
        missing = {ex.image_id for ex in self.examples} - set(self.image_index)
        if missing:
            raise ValueError(f"{len(missing)} image_ids of the questions are not in the feature store, "
                             f"e.g. {sorted(missing, key=str)[:3]}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        sample = encode_text(self.tokenizer, ex.question, self.max_text_len)
        sample.update(encode_regions(self.store[self.image_index[ex.image_id]], self.max_regions))
        sample["answer_scores"] = self.answer_vocab.soft_targets(ex.answers)
        sample["question_id"] = torch.tensor(ex.question_id)
        del sample["region_boxes"]
        return sample
