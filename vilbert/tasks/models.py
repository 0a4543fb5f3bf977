"""Building a task model from what a user has: nothing (from scratch), a pretrained checkpoint, or a fine-tuned one.

`load_task_model(task, init, ...)` accepts for `init`:
  - None: a fresh model of `config` (random weights);
  - a directory from `save_pretrained` of ViLBERTForPretraining (ours): the encoder (`bert.*`) is loaded, the task head
    starts random;
  - a directory from `save_pretrained` of the task model itself (a fine-tuned checkpoint): loaded whole;
  - an official ViLBERT checkpoint (pytorch_model*.bin, a file or its directory) with `config` giving its config:
    the encoder and, when present, the official task head (vil_prediction / vil_logit / vision_logit) are loaded.
Anything else, or a checkpoint whose encoder does not fit, is a ValueError / FileNotFoundError naming the path and keys.

Two architectures (`ARCHITECTURES`): ViLBERT ("two-stream") and the paper's single-stream baseline, with the same task
heads (`TASK_MODELS[architecture][task]`). A checkpoint of ours says which it is by its weights (only the two-stream
encoder has visual-stream layers: `checkpoint_architecture`); official checkpoints are two-stream. `architecture=None`
takes the checkpoint's (two-stream for a fresh model); one that contradicts the checkpoint is a ValueError.
"""
from pathlib import Path
from typing import Iterable, Optional

import torch

from vilbert import (SingleStreamForPretraining, SingleStreamForReferring, SingleStreamForRetrieval,
                     SingleStreamForVQA, ViLBERTConfig, ViLBERTForPretraining, ViLBERTForReferring,
                     ViLBERTForRetrieval, ViLBERTForVQA)
from vilbert.checkpoint import CONFIG_NAME, WEIGHTS_NAME, is_pretrained_dir, read_state_dict
from vilbert.model import alignment_log_odds

from .common import eval_mode, model_inputs
from .metrics import vqa_score_from_logits
from .referring import referring_hits
from .retrieval import NUM_CHOICES, PairScorer

ARCHITECTURES = ("two-stream", "single-stream")
PRETRAINING_MODELS = {"two-stream": ViLBERTForPretraining, "single-stream": SingleStreamForPretraining}
TASK_MODELS = {  # architecture -> task -> model class
    "two-stream": {"vqa": ViLBERTForVQA, "retrieval": ViLBERTForRetrieval, "referring": ViLBERTForReferring},
    "single-stream": {"vqa": SingleStreamForVQA, "retrieval": SingleStreamForRetrieval,
                      "referring": SingleStreamForReferring},
}
TASKS = tuple(TASK_MODELS["two-stream"])
# Each task model's head (the official module names); a checkpoint holding it is a fine-tuned model of that task.
TASK_HEADS = {"vqa": "vil_prediction.", "retrieval": "vil_logit.", "referring": "vision_logit."}
ENCODER_PREFIX = "bert."
# Only the two-stream encoder has a visual stream, and it always has one (the config requires v_num_hidden_layers >= 1).
VISUAL_STREAM_PREFIX = "bert.encoder.v_layer."


def task_model_class(task: str, architecture: str = "two-stream"):
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    return TASK_MODELS[architecture][task]


def checkpoint_architecture(keys: Iterable[str], where: str) -> str:
    """"two-stream" or "single-stream": which encoder a state dict of ours (pretraining or task model) holds."""
    keys = list(keys)
    if any(k.startswith(VISUAL_STREAM_PREFIX) for k in keys):
        return "two-stream"
    if any(k.startswith(ENCODER_PREFIX + "encoder.layer.") for k in keys):
        return "single-stream"
    raise ValueError(f"{where} holds no ViLBERT encoder (no {ENCODER_PREFIX}encoder.* tensors)")


def _check_architecture(found: str, asked: Optional[str], where: str) -> None:
    if asked is not None and asked != found:
        has = "has" if found == "two-stream" else "has no"
        raise ValueError(f"{where} is a {found} checkpoint (it {has} visual-stream layers {VISUAL_STREAM_PREFIX}*), "
                         f"but architecture {asked!r} was asked for: pass a {asked} checkpoint, or leave the "
                         f"architecture out to use the checkpoint's")


def load_task_model(task: str, init: Optional[str], config: Optional[ViLBERTConfig] = None,
                    backend: Optional[str] = None, num_answers: Optional[int] = None, require_head: bool = False,
                    architecture: Optional[str] = None):
    """The task model (see the module docstring). num_answers (VQA): the answer vocabulary's size, which a checkpoint
    of ours or a fresh config is set to; a fine-tuned VQA checkpoint must already have it. require_head: the
    checkpoint must hold the task head (for evaluation: a random head would give a meaningless number).
    architecture: "two-stream", "single-stream" or None (the checkpoint's; two-stream without one)."""
    cls = task_model_class(task, architecture or "two-stream")
    overrides = {} if num_answers is None else {"num_answers": num_answers}
    if init is None:
        if config is None:
            raise ValueError("load_task_model: without a checkpoint (init=None) a config is needed")
        return cls(ViLBERTConfig.from_dict({**config.to_dict(), **overrides}), backend=backend)

    path = Path(init)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {init!r} does not exist")
    if is_pretrained_dir(path):
        state = read_state_dict(path / WEIGHTS_NAME)
        found = checkpoint_architecture(state, str(path / WEIGHTS_NAME))
        _check_architecture(found, architecture, init)
        cls = task_model_class(task, found)
        saved = ViLBERTConfig.from_json(path / CONFIG_NAME)
        if any(k.startswith(TASK_HEADS[task]) for k in state):  # a fine-tuned model of this task
            if num_answers is not None and saved.num_answers != num_answers:
                raise ValueError(f"{init}: the VQA head has {saved.num_answers} answers, the answer vocabulary "
                                 f"{num_answers}; use the vocabulary it was trained with (answers.json beside it)")
            return cls.from_pretrained(path, backend=backend)
        if require_head:
            raise ValueError(f"{init} holds no {task} head ({TASK_HEADS[task]}*): fine-tune it first, or pass a "
                             f"fine-tuned checkpoint")
        model = cls(ViLBERTConfig.from_dict({**saved.to_dict(), **overrides}), backend=backend)
        _load_encoder(model, state, str(path / WEIGHTS_NAME))
        return model

    # An official checkpoint: a .bin file, or a directory with one.
    if architecture == "single-stream":
        raise ValueError(f"{init}: official ViLBERT checkpoints are two-stream; the single-stream baseline loads "
                         f"from a directory written by save_pretrained (e.g. pretrain.py --architecture single-stream)")
    if config is None:
        raise ValueError(f"{init}: not a directory from save_pretrained (no {CONFIG_NAME} + {WEIGHTS_NAME}); an "
                         f"official checkpoint needs its config (--model bert_base_6layer_6conect.json)")
    model = cls(ViLBERTConfig.from_dict({**config.to_dict(), **overrides}), backend=backend)
    report = model.load_official_state_dict(init, strict=False)
    encoder_missing = [k for k in report.missing if k.startswith(ENCODER_PREFIX)]
    if encoder_missing:
        raise ValueError(f"{init} does not fit the {task} model's encoder: missing {encoder_missing[:5]} "
                         f"({len(encoder_missing)} in all); {report}")
    # Encoder tensors with no place in the model: a deeper checkpoint than the config, or vilbert-multi-task's task
    # tokens. Dropping them would run another network than the one trained.
    encoder_extra = [k for k in report.unexpected if k.startswith(ENCODER_PREFIX)]
    if encoder_extra:
        raise ValueError(f"{init} holds encoder tensors the {task} model built from its config has no place for: "
                         f"{encoder_extra[:5]} ({len(encoder_extra)} in all); pass the checkpoint's own config "
                         "(layers, co-layers); vilbert-multi-task's task embeddings are not supported")
    if require_head and any(k.startswith(TASK_HEADS[task]) for k in report.missing):
        raise ValueError(f"{init} holds no {task} head ({TASK_HEADS[task]}*): pass a checkpoint fine-tuned on it")
    return model


def _load_encoder(model, state, where: str) -> None:
    """Copy the `bert.*` tensors of a pretraining state dict into a task model; every encoder tensor must be there."""
    encoder = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    missing, _ = model.load_state_dict(encoder, strict=False)
    encoder_missing = [k for k in missing if k.startswith(ENCODER_PREFIX)]
    if encoder_missing:  # (an empty `encoder` leaves every bert.* tensor missing)
        raise ValueError(f"{where} does not hold this model's encoder: missing {encoder_missing[:5]} "
                         f"({len(encoder_missing)} in all) of the {ENCODER_PREFIX}* tensors")


def load_pretraining_model(init: str, backend: Optional[str] = None,
                           architecture: Optional[str] = None) -> ViLBERTForPretraining:
    """The pretraining model (ViLBERT or single-stream, as the checkpoint is; `architecture` must agree when given) of
    a checkpoint directory: for zero-shot retrieval with its alignment head, or held-out pretraining metrics."""
    weights = Path(init or "") / WEIGHTS_NAME
    if init is None or not weights.is_file():
        raise FileNotFoundError(f"need a pretraining checkpoint directory (from save_pretrained, with {WEIGHTS_NAME}), "
                                f"got {init!r}")
    from safetensors import safe_open
    with safe_open(str(weights), framework="pt") as f:  # the keys only, not the tensors
        found = checkpoint_architecture(f.keys(), str(weights))
    _check_architecture(found, architecture, init)
    return PRETRAINING_MODELS[found].from_pretrained(init, backend=backend)


def alignment_score(model: ViLBERTForPretraining) -> PairScorer:
    """score_fn for `score_all_pairs`: the alignment head's log-odds that the caption belongs to the image."""
    def head(out):
        return alignment_log_odds(model.alignment_logits(out).float())  # (rows,)
    return PairScorer(model.bert, head, model)


def retrieval_score(model: ViLBERTForRetrieval) -> PairScorer:
    """score_fn for `score_all_pairs`: the fine-tuned pair-score head (vil_logit)."""
    return PairScorer(model.bert, model.pair_scores, model)


@torch.no_grad()
def task_hits(task: str, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-example metric of a task batch: the VQA score, the referring hit (IoU >= 0.5), or for retrieval training
    batches (groups of NUM_CHOICES pairs, the positive first, as RetrievalTrainDataset makes them) whether the positive
    scored highest, per group."""
    if task == "vqa":
        return vqa_score_from_logits(logits.float(), batch["answer_scores"])
    if task == "referring":
        return referring_hits(logits.float(), batch)
    if task == "retrieval":
        return (logits.view(-1, NUM_CHOICES).argmax(dim=1) == 0).float()  # (groups,)
    raise ValueError(f"task: expected one of {TASKS}, got {task!r}")


@torch.no_grad()
def evaluate_batches(task: str, model, loader, device) -> dict:
    """VQA accuracy or referring accuracy (IoU >= 0.5) of `model` over a loader of task batches, in [0, 1]."""
    if task not in ("vqa", "referring"):
        raise ValueError(f"evaluate_batches handles vqa and referring (retrieval: score_all_pairs), got {task!r}")
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            hits = task_hits(task, model(**model_inputs(batch)).logits, batch)
            total += hits.sum().item()
            count += len(hits)
    if count == 0:
        raise ValueError("evaluation loader yielded no samples")
    return {"vqa_accuracy" if task == "vqa" else "referring_accuracy": total / count, "num_samples": count}
