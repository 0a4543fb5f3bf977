"""train/finetune.py and vilbert/tasks/models.py: checkpoint loading, and short CPU fine-tunes per task.

The fine-tunes run `finetune.main` in this process (a world of one over gloo) on the tiny model and a tiny built-in
task set. The default run checks the whole path per task in a few steps (reader, collator, head, loss, DeepSpeed step,
save, evaluation, reload), for ViLBERT and for the single-stream baseline; resuming after SIGTERM (sent from inside
the loop) against an uninterrupted run, step for step and sample for sample; ZeRO-2 against stage 0; and a longer
ViLBERT fine-tune per task (about a minute for the three) that must beat the metric's chance level: from random weights
the tiny model needs a few hundred steps before text and image align (retrieval and referring cannot be solved from
the text alone), so it evaluates on its own train split (`--val_split train`). `-m slow` adds the same for the
single-stream model, and a 2-rank resume through the launcher. Transfer to held-out images, pretrained vs from
scratch, is measured by the commands in the README.
"""
import json
import os
import shutil
import signal
import socket
import sys

import pytest
import torch

from vilbert import (SingleStreamForPretraining, SingleStreamForReferring, SingleStreamForRetrieval, SingleStreamForVQA,
                     ViLBERTConfig, ViLBERTForPretraining, ViLBERTForRetrieval, ViLBERTForVQA)
from vilbert.data import load_tokenizer
from vilbert.tasks.models import load_pretraining_model, load_task_model
from vilbert.tasks.retrieval import load_captions, retrieval_eval_set, score_all_pairs
from vilbert.tasks.synthetic import write_synthetic_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))
import finetune  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    os.environ.setdefault("MASTER_PORT", str(free_port()))


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return str(write_synthetic_tasks(tmp_path_factory.mktemp("tasks") / "data", {"train": 8, "val": 4}))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """The tiny preset with the shipped tokenizer's vocab and no dropout (so a short run fits its data)."""
    values = ViLBERTConfig.preset("tiny", vocab_size=load_tokenizer().vocab_size).to_dict()
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "v_hidden_dropout_prob",
                "v_attention_probs_dropout_prob"):
        values[key] = 0.0
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(values))
    return str(path)


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory):
    """train/ds_finetune_cpu.json with a batch of 16 and a learning rate for the tiny model."""
    with open(os.path.join(ROOT, "train", "ds_finetune_cpu.json")) as f:
        config = json.load(f)
    config.update(train_batch_size=16, train_micro_batch_size_per_gpu=16)
    config["optimizer"]["params"]["lr"] = config["scheduler"]["params"]["warmup_max_lr"] = 1e-3
    path = tmp_path_factory.mktemp("ds") / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def metrics_lines(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def eval_record(output_dir):
    return [r for r in metrics_lines(output_dir) if "eval" in r][-1]


METRICS = {"vqa": "vqa_accuracy", "retrieval": "image_retrieval_R@1", "referring": "referring_accuracy"}


def finetune_from_scratch(task, steps, tasks_dir, tiny_config, ds_config, output_dir, architecture="two-stream"):
    """Runs finetune.py from random weights, evaluating on the train split; returns (losses, eval record)."""
    status = finetune.main(["--task", task, "--init", "none", "--model", tiny_config, "--data", tasks_dir,
                            "--deepspeed_config", ds_config, "--max_steps", str(steps), "--val_split", "train",
                            "--output_dir", str(output_dir), "--log_interval", "2", "--seed", "1",
                            "--architecture", architecture])
    assert status == 0
    with open(output_dir / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    return losses, eval_record(output_dir)


def test_a_metrics_line_covers_its_whole_window(tasks_dir, tiny_config, ds_config, tmp_path):
    """With --log_interval 2 a line holds the mean loss of the two steps and the hits over all their examples, as the
    same run logged step by step gives them. A retrieval example is a group of four choices: 16 a step here."""
    def training_lines(log_interval):
        output_dir = tmp_path / f"every{log_interval}"
        assert finetune.main(["--task", "retrieval", "--init", "none", "--model", tiny_config, "--data", tasks_dir,
                              "--deepspeed_config", ds_config, "--max_steps", "4", "--seed", "1",
                              "--log_interval", str(log_interval), "--output_dir", str(output_dir)]) == 0
        return [line for line in metrics_lines(output_dir) if "loss" in line]

    each, pairs = training_lines(1), training_lines(2)
    hits = [line["train_metric"] * 16 for line in each]
    assert hits == [round(h) for h in hits] and 0 < sum(hits) and max(hits) <= 16, hits
    assert [line["step"] for line in pairs] == [2, 4]
    for window, (first, second) in zip(pairs, (each[:2], each[2:])):
        assert window["loss"] == pytest.approx((first["loss"] + second["loss"]) / 2, rel=1e-6)
        assert window["train_metric"] == pytest.approx((first["train_metric"] + second["train_metric"]) / 2)


def test_epochs_count_optimizer_steps_of_the_global_batch(tasks_dir, tiny_config, ds_config, tmp_path):
    """--epochs 3 over the 16 retrieval training pairs, micro batches of 8 accumulating into steps of 16: 3 steps,
    one an epoch."""
    with open(ds_config) as f:
        config = json.load(f) | {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    assert finetune.main(["--task", "retrieval", "--init", "none", "--model", tiny_config, "--data", tasks_dir,
                          "--deepspeed_config", str(tmp_path / "ds.json"), "--epochs", "3", "--log_interval", "1",
                          "--output_dir", str(tmp_path / "out")]) == 0
    lines = [line for line in metrics_lines(tmp_path / "out") if "loss" in line]
    assert [(line["step"], line["epoch"], line["samples"]) for line in lines] == [(1, 0, 16), (2, 1, 32), (3, 2, 48)]


@pytest.mark.parametrize("task", ["vqa", "retrieval", "referring"])
def test_finetune_trains_saves_and_reloads(task, tasks_dir, tiny_config, ds_config, tmp_path):
    output_dir = tmp_path / task
    losses, record = finetune_from_scratch(task, 4, tasks_dir, tiny_config, ds_config, output_dir)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert 0.0 <= record[METRICS[task]] <= 1.0 and record["eval"] == "train"
    # The saved task model is a fine-tuned checkpoint: evaluation-only reloads it (for VQA with the answers.json
    # beside it) and gets the same number.
    again = tmp_path / f"{task}_eval"
    assert finetune.main(["--task", task, "--init", str(output_dir / "final"), "--data", tasks_dir, "--eval_only",
                          "--deepspeed_config", ds_config, "--val_split", "train", "--output_dir", str(again)]) == 0
    assert eval_record(again)[METRICS[task]] == pytest.approx(record[METRICS[task]])


def test_continued_vqa_finetune_keeps_the_checkpoints_answers(tiny_config, ds_config, tmp_path):
    """The head of a fine-tuned VQA model indexes its answers.json: training it further on other questions (whose
    own top answers come in another order) must keep that vocabulary, not rebuild one."""
    tasks_dir = str(write_synthetic_tasks(tmp_path / "data", {"train": 8, "val": 8}))
    first = tmp_path / "first"
    finetune_from_scratch("vqa", 2, tasks_dir, tiny_config, ds_config, first)
    answers = json.loads((first / "final" / "answers.json").read_text())
    assert finetune.main(["--task", "vqa", "--init", str(first / "final"), "--data", tasks_dir, "--max_steps", "2",
                          "--train_split", "val", "--deepspeed_config", ds_config,
                          "--output_dir", str(tmp_path / "second")]) == 0
    assert json.loads((tmp_path / "second" / "final" / "answers.json").read_text()) == answers


def test_official_checkpoint_directory_takes_its_config_from_model(tasks_dir, tiny_config, ds_config, tmp_path):
    official = tmp_path / "official"
    official.mkdir()
    torch.save(ViLBERTForRetrieval(ViLBERTConfig.from_json(tiny_config)).to_official_state_dict(),
               official / "pytorch_model.bin")
    assert finetune.main(["--task", "retrieval", "--init", str(official), "--model", tiny_config, "--eval_only",
                          "--data", tasks_dir, "--deepspeed_config", ds_config,
                          "--output_dir", str(tmp_path / "out")]) == 0


# Chance levels on the train split of the tiny set (8 images, 16 questions / captions / expressions): VQA, a uniform
# guess over ~30 answers, under 0.05; retrieval R@1 1/8; referring 1/num_objects (3-8 objects), about 0.2.
@pytest.mark.parametrize("architecture", ["two-stream", pytest.param("single-stream", marks=pytest.mark.slow)])
@pytest.mark.parametrize("task, steps, chance", [("vqa", 100, 0.05), ("retrieval", 300, 1 / 8),
                                                 ("referring", 300, 0.25)])
def test_finetune_beats_chance(task, steps, chance, architecture, tasks_dir, tiny_config, ds_config, tmp_path):
    losses, record = finetune_from_scratch(task, steps, tasks_dir, tiny_config, ds_config, tmp_path / task,
                                           architecture)
    assert record[METRICS[task]] > chance + 0.1, record
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("pretraining_class", [ViLBERTForPretraining, SingleStreamForPretraining])
def test_zero_shot_retrieval_from_pretraining_checkpoint(pretraining_class, tasks_dir, tiny_config, ds_config,
                                                         tmp_path):
    pretraining_class(ViLBERTConfig.from_json(tiny_config)).save_pretrained(tmp_path / "pretrained")
    status = finetune.main(["--task", "retrieval", "--zero_shot", "--init", str(tmp_path / "pretrained"),
                            "--data", tasks_dir, "--deepspeed_config", ds_config, "--output_dir", str(tmp_path / "zs")])
    assert status == 0
    record = eval_record(tmp_path / "zs")
    assert record["zero_shot"] and record["num_images"] == 4 and 0 <= record["image_retrieval_R@1"] <= 1
    # --max_eval_images: the first N val images and exactly their captions.
    status = finetune.main(["--task", "retrieval", "--zero_shot", "--init", str(tmp_path / "pretrained"),
                            "--data", tasks_dir, "--deepspeed_config", ds_config, "--output_dir", str(tmp_path / "zs2"),
                            "--max_eval_images", "2"])
    assert status == 0
    image_ids, _, caption_image = retrieval_eval_set(load_captions(os.path.join(tasks_dir, "captions_val.jsonl")))
    assert len(image_ids) == 4 and 0 < (caption_image < 2).sum() < len(caption_image)
    record = eval_record(tmp_path / "zs2")
    assert record["num_images"] == 2 and record["num_captions"] == (caption_image < 2).sum()


def test_retrieval_takes_the_official_hard_negative_pool(tasks_dir, tiny_config, ds_config, tmp_path, capsys):
    import pickle
    images = sorted({image_id for image_id, _ in load_captions(os.path.join(tasks_dir, "captions_train.jsonl"))})
    # vilbert-multi-task's layout: per image, indices into the image list of its nearest images (itself first).
    pool = [[row, (row + 1) % len(images), (row + 2) % len(images)] for row in range(len(images))]
    with open(tmp_path / "hard_negative.pkl", "wb") as f:
        pickle.dump({"train_image_list": images, "train_hard_pool": pool}, f)
    assert finetune.main(["--task", "retrieval", "--init", "none", "--model", tiny_config, "--data", tasks_dir,
                          "--hard_negatives", str(tmp_path / "hard_negative.pkl"), "--max_steps", "1",
                          "--deepspeed_config", ds_config, "--output_dir", str(tmp_path / "out")]) == 0
    assert f"hard negatives: {len(images)} of {len(images)} train images have a pool" in capsys.readouterr().out
    # Without --hard_negatives, <data>/hard_negative.pkl is the pool.
    shutil.copytree(tasks_dir, tmp_path / "data")
    shutil.copy(tmp_path / "hard_negative.pkl", tmp_path / "data")
    assert finetune.main(["--task", "retrieval", "--init", "none", "--model", tiny_config, "--data",
                          str(tmp_path / "data"), "--max_steps", "1", "--deepspeed_config", ds_config,
                          "--output_dir", str(tmp_path / "default_pool")]) == 0
    assert f"have a pool from {tmp_path / 'data' / 'hard_negative.pkl'}" in capsys.readouterr().out


def test_bad_arguments_fail_clearly(tasks_dir, tiny_config, ds_config, tmp_path, capsys):
    """Each bad input ends the run with status 2 and one error line that names it, before any training step."""
    (tmp_path / "empty").mkdir()
    empty, features, nowhere = str(tmp_path / "empty"), os.path.join(tasks_dir, "features"), str(tmp_path / "nowhere")
    with open(ds_config) as f:
        config = json.load(f)
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps(config | {"zero_optimization": {"stage": 3}}))
    big_batch = tmp_path / "big_batch.json"
    big_batch.write_text(json.dumps(config | {"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 4096}))
    scratch = ["--init", "none", "--model", tiny_config]
    pretrained = str(tmp_path / "pretrained")
    ViLBERTForPretraining(ViLBERTConfig.from_json(tiny_config)).save_pretrained(pretrained)
    cases = [
        (["--task", "vqa", "--init", nowhere], f"--init {nowhere!r} does not exist"),
        (["--task", "vqa", "--zero_shot", "--init", "none"], "--zero_shot is for --task retrieval"),
        (["--task", "vqa", "--hard_negatives", ds_config, "--init", "none"],
         "--hard_negatives is for --task retrieval"),
        (["--task", "retrieval", "--hard_negatives", nowhere, "--init", "none"], f"--hard_negatives {nowhere!r}"),
        (["--task", "retrieval", "--hard_negatives", ds_config, "--eval_only", "--init", "none"],
         "--hard_negatives is for training"),
        (["--task", "vqa", "--eval_only", "--init", "none"], "--eval_only needs a checkpoint"),
        (["--task", "referring", "--eval_only", "--init", pretrained], f"{pretrained} holds no referring head"),
        (["--task", "vqa", *scratch, "--eval_batch_size", "0"], "--eval_batch_size must be >= 1, got 0"),
        (["--task", "vqa", *scratch, "--max_regions", "0"], "--max_regions must be >= 1, got 0"),
        (["--task", "vqa", *scratch, "--deepspeed_config", str(zero3)], "ZeRO-3 is not supported by finetune.py"),
        (["--task", "vqa", *scratch, "--vocab_file", nowhere], f"--vocab_file {nowhere!r} does not exist"),
        (["--task", "vqa", *scratch, "--data", ds_config], f"--data {ds_config!r} is not a directory"),
        (["--task", "referring", *scratch, "--data", empty], "no store at"),
        (["--task", "referring", *scratch, "--data", empty, "--features", features], "no refs_train.json/.jsonl"),
        (["--task", "vqa", *scratch, "--data", empty, "--features", features],
         f"--data {empty!r}: no v2_OpenEnded_mscoco_train_questions.json"),
        (["--task", "vqa", *scratch, "--deepspeed_config", str(big_batch)], "fewer than one micro batch per rank"),
    ]
    common = ["--data", tasks_dir, "--deepspeed_config", ds_config, "--output_dir", str(tmp_path / "out")]
    for argv, message in cases:
        assert finetune.main([*common, *argv]) == 2, argv  # later options win: a case's --data replaces common's
        err = capsys.readouterr().err
        assert "finetune.py: error: " in err and message in err, (argv, err)
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------- checkpoint loading

def test_load_task_model_from_pretraining_checkpoint(tmp_path):
    config = ViLBERTConfig.preset("tiny")
    pretrained = ViLBERTForPretraining(config)
    pretrained.save_pretrained(tmp_path / "pre")
    model = load_task_model("vqa", str(tmp_path / "pre"), num_answers=5)
    assert isinstance(model, ViLBERTForVQA) and model.config.num_answers == 5
    for name, value in pretrained.bert.state_dict().items():
        assert torch.equal(model.bert.state_dict()[name], value), name


def test_load_task_model_fine_tuned_and_errors(tmp_path):
    config = ViLBERTConfig.preset("tiny")
    ViLBERTForVQA(config).save_pretrained(tmp_path / "vqa")
    assert load_task_model("vqa", str(tmp_path / "vqa"), num_answers=config.num_answers).config.num_answers == 7
    with pytest.raises(ValueError, match="answers"):
        load_task_model("vqa", str(tmp_path / "vqa"), num_answers=9)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task_model("retrieval", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="official checkpoint needs its config"):
        load_task_model("retrieval", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="task must be one of"):
        load_task_model("nlvr2", None, config)
    # A retrieval checkpoint is not a pretraining one: its encoder loads into a referring model, the head starts fresh.
    ViLBERTForRetrieval(config).save_pretrained(tmp_path / "ret")
    assert load_task_model("referring", str(tmp_path / "ret")).config.num_answers == 7
    with pytest.raises(ValueError, match="holds no referring head"):  # evaluating a random head is an error
        load_task_model("referring", str(tmp_path / "ret"), require_head=True)


def test_load_task_model_official_state_dict(tmp_path):
    config = ViLBERTConfig.preset("tiny")
    source = ViLBERTForPretraining(config)
    torch.save(source.to_official_state_dict(), tmp_path / "pytorch_model.bin")
    model = load_task_model("retrieval", str(tmp_path / "pytorch_model.bin"), config)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, source.bert.embeddings.word_embeddings.weight)
    truncated = {k: v for k, v in source.to_official_state_dict().items() if "c_layer.0." not in k}
    torch.save(truncated, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="does not fit the retrieval model's encoder"):
        load_task_model("retrieval", str(tmp_path / "bad.bin"), config)
    with pytest.raises(ValueError, match="holds no retrieval head"):  # a pretraining checkpoint has no vil_logit
        load_task_model("retrieval", str(tmp_path / "pytorch_model.bin"), config, require_head=True)
    # A deeper checkpoint than the config, or vilbert-multi-task's task tokens: tensors with no place are an error.
    deeper = ViLBERTConfig.preset("tiny", num_hidden_layers=config.num_hidden_layers + 1)
    torch.save(ViLBERTForPretraining(deeper).to_official_state_dict(), tmp_path / "deeper.bin")
    with pytest.raises(ValueError, match=r"has no place for: \['bert.encoder.layer"):
        load_task_model("retrieval", str(tmp_path / "deeper.bin"), config)
    task_tokens = {**source.to_official_state_dict(), "bert.embeddings.task_embeddings.weight": torch.zeros(20, 32)}
    torch.save(task_tokens, tmp_path / "multi_task.bin")
    with pytest.raises(ValueError, match="task_embeddings"):
        load_task_model("retrieval", str(tmp_path / "multi_task.bin"), config)


def test_score_all_pairs_matches_one_pair_at_a_time(tasks_dir):
    """Batching captions over padded image chunks gives each pair the score it gets alone, unpadded."""
    from vilbert.data import open_store
    from vilbert.tasks.common import TaskCollator, encode_regions, encode_text, index_images, model_inputs
    from vilbert.tasks.models import retrieval_score

    torch.manual_seed(0)
    model = ViLBERTForRetrieval(ViLBERTConfig.preset("tiny", vocab_size=load_tokenizer().vocab_size)).eval()
    store, tokenizer = open_store(os.path.join(tasks_dir, "features")), load_tokenizer()
    image_ids, captions, _ = retrieval_eval_set(load_captions(os.path.join(tasks_dir, "captions_val.jsonl")))
    scores = score_all_pairs(retrieval_score(model), store, tokenizer, image_ids, captions[:3], image_chunk=3,
                             max_text_len=30, max_regions=100)
    index = index_images(store)
    for i, image_id in enumerate(image_ids):
        for c, caption in enumerate(captions[:3]):
            sample = {**encode_text(tokenizer, caption, 30), **encode_regions(store[index[image_id]], 100)}
            with torch.no_grad():
                alone = model(**model_inputs(TaskCollator()([sample]))).logits
            assert scores[i, c].item() == pytest.approx(alone.item(), abs=1e-5)


def test_score_all_pairs_runs_the_model_without_dropout(tasks_dir):
    from vilbert.data import open_store
    from vilbert.tasks.models import retrieval_score

    config = ViLBERTConfig.preset("tiny", vocab_size=load_tokenizer().vocab_size, hidden_dropout_prob=0.3,
                                  attention_probs_dropout_prob=0.3, v_hidden_dropout_prob=0.3)
    model = ViLBERTForRetrieval(config)  # in train mode, as after training
    store, tokenizer = open_store(os.path.join(tasks_dir, "features")), load_tokenizer()
    image_ids, captions, _ = retrieval_eval_set(load_captions(os.path.join(tasks_dir, "captions_val.jsonl")))
    first, second = (score_all_pairs(retrieval_score(model), store, tokenizer, image_ids, captions[:3])
                     for _ in range(2))
    assert torch.equal(first, second) and model.training


# ---------------------------------------------------------------------------------------------- single-stream baseline

@pytest.fixture(scope="module")
def single_stream_pretrained(tmp_path_factory, tiny_config):
    """A save_pretrained directory of SingleStreamForPretraining (what `pretrain.py --architecture single-stream`
    exports), random weights."""
    path = tmp_path_factory.mktemp("single") / "pretrained"
    torch.manual_seed(0)
    SingleStreamForPretraining(ViLBERTConfig.from_json(tiny_config)).save_pretrained(path)
    return path


SINGLE_STREAM_TASK_MODELS = {"vqa": SingleStreamForVQA, "retrieval": SingleStreamForRetrieval,
                             "referring": SingleStreamForReferring}


@pytest.mark.parametrize("task", ["vqa", "retrieval", "referring"])
def test_single_stream_finetune_from_single_stream_checkpoint(task, single_stream_pretrained, tasks_dir, ds_config,
                                                              tmp_path, capsys):
    """The checkpoint's weights say single-stream: the task model is the single-stream one, it trains (its encoder
    moves; VQA's and referring's losses fall within 12 steps, retrieval's 4-way loss stays near log 4 until the model
    matches captions to images, see the slow test), and the fine-tuned checkpoint reloads for evaluation."""
    output_dir = tmp_path / task
    assert finetune.main(["--task", task, "--init", str(single_stream_pretrained), "--data", tasks_dir,
                          "--deepspeed_config", ds_config, "--max_steps", "12", "--val_split", "train",
                          "--output_dir", str(output_dir), "--log_interval", "1"]) == 0
    assert f"{SINGLE_STREAM_TASK_MODELS[task].__name__} from" in capsys.readouterr().out
    losses = [r["loss"] for r in metrics_lines(output_dir) if "loss" in r]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    if task != "retrieval":
        assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    tuned = load_task_model(task, str(output_dir / "final"), require_head=True)
    assert isinstance(tuned, SINGLE_STREAM_TASK_MODELS[task])
    pretrained = SingleStreamForPretraining.from_pretrained(single_stream_pretrained).bert.state_dict()
    layers = [name for name in pretrained if name.startswith("encoder.layer.")]  # (referring needs no pooler)
    assert layers and all(not torch.equal(tuned.bert.state_dict()[name], pretrained[name]) for name in layers)
    extra = ["--answers", str(output_dir / "final" / "answers.json")] if task == "vqa" else []
    assert finetune.main(["--task", task, "--init", str(output_dir / "final"), "--data", tasks_dir, "--eval_only",
                          "--deepspeed_config", ds_config, "--val_split", "train", "--output_dir",
                          str(tmp_path / "eval"), *extra]) == 0
    assert eval_record(tmp_path / "eval")[METRICS[task]] == pytest.approx(eval_record(output_dir)[METRICS[task]])


def test_load_task_model_architectures(single_stream_pretrained, tiny_config, tmp_path):
    config = ViLBERTConfig.from_json(tiny_config)
    pretrained = SingleStreamForPretraining.from_pretrained(single_stream_pretrained)
    model = load_task_model("referring", str(single_stream_pretrained))  # architecture from the checkpoint
    assert isinstance(model, SingleStreamForReferring)
    assert model.vision_logit.in_features == config.hidden_size  # the single stream's region width
    for name, value in pretrained.bert.state_dict().items():
        assert torch.equal(model.bert.state_dict()[name], value), name
    assert isinstance(load_task_model("vqa", str(single_stream_pretrained), architecture="single-stream"),
                      SingleStreamForVQA)
    assert isinstance(load_task_model("retrieval", None, config, architecture="single-stream"),
                      SingleStreamForRetrieval)
    assert isinstance(load_task_model("retrieval", None, config), ViLBERTForRetrieval)  # default: two-stream
    assert isinstance(load_pretraining_model(str(single_stream_pretrained)), SingleStreamForPretraining)
    # The architecture asked for must be the checkpoint's, and official checkpoints are two-stream.
    with pytest.raises(ValueError, match="is a single-stream checkpoint .* but architecture 'two-stream' was asked"):
        load_task_model("vqa", str(single_stream_pretrained), architecture="two-stream")
    with pytest.raises(ValueError, match="is a single-stream checkpoint"):
        load_pretraining_model(str(single_stream_pretrained), architecture="two-stream")
    ViLBERTForPretraining(config).save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="is a two-stream checkpoint .* but architecture 'single-stream' was asked"):
        load_task_model("vqa", str(tmp_path / "two"), architecture="single-stream")
    torch.save(ViLBERTForPretraining(config).to_official_state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="official ViLBERT checkpoints are two-stream"):
        load_task_model("vqa", str(tmp_path / "pytorch_model.bin"), config, architecture="single-stream")
    with pytest.raises(ValueError, match="architecture must be one of"):
        load_task_model("vqa", None, config, architecture="three-stream")


def test_architecture_mismatch_fails_with_one_line(single_stream_pretrained, tasks_dir, ds_config, tmp_path,
                                                   capsys):
    status = finetune.main(["--task", "vqa", "--init", str(single_stream_pretrained), "--architecture", "two-stream",
                            "--data", tasks_dir, "--deepspeed_config", ds_config, "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "is a single-stream checkpoint" in err[0], err


# ---------------------------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def resume_configs(tmp_path_factory, tiny_config, ds_config):
    """The tiny model with dropout 0.1 (so the restored RNG states matter) and a global batch of 8 from 2 micro
    batches of 4 (gradient accumulation): 16 retrieval pairs make 2 optimizer steps per epoch."""
    directory = tmp_path_factory.mktemp("resume")
    with open(tiny_config) as f:
        model = json.load(f)
    model.update({key: 0.1 for key in model if key.endswith("dropout_prob")})
    with open(ds_config) as f:
        ds = json.load(f)
    ds.update(train_batch_size=8, train_micro_batch_size_per_gpu=4)
    (directory / "model.json").write_text(json.dumps(model))
    (directory / "ds.json").write_text(json.dumps(ds))
    return str(directory / "model.json"), str(directory / "ds.json")


def resume_run(output_dir, tasks_dir, resume_configs, *extra):
    model, ds = resume_configs
    return finetune.main(["--task", "retrieval", "--init", "none", "--model", model, "--data", tasks_dir,
                          "--deepspeed_config", ds, "--max_steps", "5", "--val_split", "train", "--seed", "3",
                          "--output_dir", str(output_dir), "--log_interval", "1", "--log_samples",
                          "--save_interval", "100", *extra])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tasks_dir, resume_configs):
    output_dir = tmp_path_factory.mktemp("straight")
    assert resume_run(output_dir, tasks_dir, resume_configs) == 0
    return output_dir


def step_samples(output_dir):
    """{step: dataset indices of the global batch}; a resumed run's lines (later in the file) win."""
    with open(output_dir / "samples_rank0.jsonl") as f:
        return {r["step"]: r["indices"] for r in map(json.loads, f)}


def sigterm_during_micro_step(monkeypatch, micro_step):
    """SIGTERM to this process during the forward of micro step `micro_step` (counted from 1)."""
    calls = {"n": 0}
    task_targets = finetune.task_targets

    def signalling_task_targets(task, batch):
        calls["n"] += 1
        if calls["n"] == micro_step:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by finetune.py: finish the step, save, exit 0
        return task_targets(task, batch)

    monkeypatch.setattr(finetune, "task_targets", signalling_task_targets)


# SIGTERM during micro step 3 stops after optimizer step 2 (the end of epoch 0), during micro step 5 after step 3
# (half way through epoch 1). With loader workers the sampler runs batches ahead of the loop: the checkpoint must hold
# the loop's position.
@pytest.mark.parametrize("signal_at_micro_step, workers", [(3, 0), (5, 0), (5, 2)])
def test_sigterm_then_resume_equals_uninterrupted(signal_at_micro_step, workers, uninterrupted, tasks_dir,
                                                  resume_configs, tmp_path, monkeypatch, capsys):
    task_targets = finetune.task_targets
    sigterm_during_micro_step(monkeypatch, signal_at_micro_step)
    assert resume_run(tmp_path, tasks_dir, resume_configs, "--num_workers", str(workers)) == 0
    stopped_at = (signal_at_micro_step + 1) // 2
    assert "checkpoint saved, rerun to resume" in capsys.readouterr().out
    assert max(step_samples(tmp_path)) == stopped_at and not (tmp_path / "final").exists()
    monkeypatch.setattr(finetune, "task_targets", task_targets)
    assert resume_run(tmp_path, tasks_dir, resume_configs) == 0
    assert f"resumed from {tmp_path}/global_step{stopped_at}" in capsys.readouterr().out

    assert step_samples(tmp_path) == step_samples(uninterrupted)  # no sample repeated or skipped
    lines = [r for r in metrics_lines(tmp_path) if "loss" in r]
    straight = [r for r in metrics_lines(uninterrupted) if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    for key in ("loss", "lr", "samples", "epoch"):
        assert [r[key] for r in lines] == pytest.approx([r[key] for r in straight], rel=1e-6), key
    assert eval_record(tmp_path)["image_retrieval_R@1"] == eval_record(uninterrupted)["image_retrieval_R@1"]
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("global_step")) == [
        f"global_step{stopped_at}", "global_step5"]  # --keep_last 2: the signal's checkpoint and the last one


def test_zero2_matches_zero0_and_exports_fp32_weights(tasks_dir, tiny_config, ds_config, tmp_path):
    """ZeRO-2 shards the optimizer: the same losses as stage 0, and final/ holds the weights consolidated from the
    ZeRO checkpoint (the same as stage 0's)."""
    with open(ds_config) as f:
        zero2 = dict(json.load(f), zero_optimization={"stage": 2})
    (tmp_path / "zero2.json").write_text(json.dumps(zero2))
    runs = {}
    for name, config in (("zero0", ds_config), ("zero2", str(tmp_path / "zero2.json"))):
        assert finetune.main(["--task", "referring", "--init", "none", "--model", tiny_config, "--data", tasks_dir,
                              "--deepspeed_config", config, "--max_steps", "4", "--val_split", "train",
                              "--output_dir", str(tmp_path / name), "--log_interval", "1"]) == 0
        runs[name] = ([r["loss"] for r in metrics_lines(tmp_path / name) if "loss" in r],
                      load_task_model("referring", str(tmp_path / name / "final"), require_head=True).state_dict())
    assert runs["zero2"][0] == pytest.approx(runs["zero0"][0], rel=1e-5)
    for name, value in runs["zero0"][1].items():
        assert value.dtype == runs["zero2"][1][name].dtype == torch.float32
        torch.testing.assert_close(runs["zero2"][1][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_a_stop_logs_the_steps_since_the_last_line(tasks_dir, resume_configs, tmp_path, monkeypatch):
    """--log_interval 4 and SIGTERM during step 3: the stop writes a line for steps 1-3 (a resumed run starts a new
    window). The metrics.jsonl of a run that saved no checkpoint is replaced, not continued: its steps run again."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 9, "loss": 0.0}) + "\n")
    sigterm_during_micro_step(monkeypatch, 5)
    assert resume_run(tmp_path, tasks_dir, resume_configs, "--log_interval", "4") == 0
    assert [line["step"] for line in metrics_lines(tmp_path)] == [3]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_sigterm_one_rank_then_resume(tasks_dir, resume_configs, tmp_path):
    """Through the launcher, 2 ranks x micro 4, ZeRO-2: SIGTERM to one rank stops both at the same step with a
    checkpoint; the rerun resumes and matches the uninterrupted 2-rank run step for step, sample for sample."""
    import subprocess
    import time

    import psutil

    model, ds = resume_configs
    with open(ds) as f:
        (tmp_path / "zero2.json").write_text(json.dumps(dict(json.load(f), zero_optimization={"stage": 2})))
    script = os.path.join(ROOT, "train", "finetune.py")
    common = ["--task", "retrieval", "--init", "none", "--model", model, "--data", tasks_dir, "--max_steps", "24",
              "--deepspeed_config", str(tmp_path / "zero2.json"), "--val_split", "train", "--log_interval", "1",
              "--log_samples", "--save_interval", "100", "--max_eval_images", "2"]

    def launch(output_dir):
        env = dict(os.environ, DS_ACCELERATOR="cpu", LOCAL_SIZE="2", OMP_NUM_THREADS="1")
        command = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
                   str(free_port()), script, "--output_dir", str(output_dir), *common]
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(process):
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-5000:]
        return output

    def samples(output_dir):
        steps = {}
        for rank in (0, 1):
            with open(output_dir / f"samples_rank{rank}.jsonl") as f:
                for record in map(json.loads, f):
                    steps.setdefault(rank, {})[record["step"]] = record["indices"]
        return {step: sorted(steps[0][step] + steps[1][step]) for step in steps[0]}

    finish(launch(tmp_path / "straight"))
    cut = launch(tmp_path / "cut")
    deadline = time.monotonic() + 600
    while not (tmp_path / "cut" / "metrics.jsonl").exists() or not metrics_lines(tmp_path / "cut")[2:]:
        assert cut.poll() is None and time.monotonic() < deadline, "the run ended before step 3"
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(cut.pid).children(recursive=True) if script in " ".join(p.cmdline())]
    os.kill(ranks[-1].pid, signal.SIGTERM)  # one rank: the other must stop at the same step
    assert "checkpoint saved, rerun to resume" in finish(cut)
    stopped = max(samples(tmp_path / "cut"))
    assert 3 <= stopped < 24
    assert "resumed from" in finish(launch(tmp_path / "cut"))
    assert samples(tmp_path / "cut") == samples(tmp_path / "straight")
    lines = {r["step"]: r["loss"] for r in metrics_lines(tmp_path / "cut") if "loss" in r}
    straight = [r["loss"] for r in metrics_lines(tmp_path / "straight") if "loss" in r]
    assert [lines[s] for s in sorted(lines)] == pytest.approx(straight, rel=1e-6)
