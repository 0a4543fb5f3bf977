"""Downstream tasks: the paper's metrics, readers for the real data layouts, and built-in synthetic versions.

    from vilbert.tasks import metrics                       # vqa_accuracy, retrieval_recall, box_iou, ...
    from vilbert.tasks.vqa import load_vqa, AnswerVocab, VQADataset
    from vilbert.tasks.retrieval import load_captions, RetrievalTrainDataset, score_all_pairs
    from vilbert.tasks.referring import load_refs, ReferringDataset
    from vilbert.tasks.synthetic import ensure_synthetic_tasks   # the built-in task data, in the real layouts
    from vilbert.tasks.models import load_task_model        # scratch / pretrained / fine-tuned / official weights

Every dataset yields dicts with the model's input keys plus the task's targets (`answer_scores`, `region_scores`;
retrieval items are groups of NUM_CHOICES samples, the positive first); `common.TaskCollator` pads them into batches.
train/finetune.py runs fine-tuning and evaluation.
"""
from . import metrics
from .common import TaskCollator, encode_regions, encode_text, model_inputs
from .models import TASK_MODELS, load_task_model

__all__ = ["metrics", "TaskCollator", "encode_regions", "encode_text", "model_inputs", "TASK_MODELS",
           "load_task_model"]
