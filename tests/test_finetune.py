"""train/finetune.py and vilbert/tasks/models.py: checkpoint loading, and short CPU fine-tunes per task.

The fine-tunes run `finetune.main` in this process (a world of one over gloo) on the tiny model and a tiny built-in
task set. The default run checks the whole path per task in a few steps (reader, collator, head, loss, DeepSpeed step,
save, evaluation, reload). `-m slow` adds a longer fine-tune per task that must beat the metric's chance level: from
random weights the tiny model needs a few hundred steps before the two streams align (retrieval and referring cannot be
solved from one stream), so it evaluates on its own train split (`--val_split train`) and is too long for the default
run. Transfer to held-out images, pretrained vs from scratch, is measured by the commands in the README.
"""
import json
import os
import socket
import sys

import pytest
import torch

from vilbert import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForRetrieval, ViLBERTForVQA
from vilbert.data import load_tokenizer
from vilbert.tasks.models import load_task_model
from vilbert.tasks.synthetic import write_synthetic_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))
import finetune  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared CPU
    yield
    torch.set_num_threads(threads)


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


def eval_record(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"eval"' in line][-1]


METRICS = {"vqa": "vqa_accuracy", "retrieval": "image_retrieval_R@1", "referring": "referring_accuracy"}


def finetune_from_scratch(task, steps, tasks_dir, tiny_config, ds_config, output_dir):
    """Runs finetune.py from random weights, evaluating on the train split; returns (losses, eval record)."""
    status = finetune.main(["--task", task, "--init", "none", "--model", tiny_config, "--data", tasks_dir,
                            "--deepspeed_config", ds_config, "--max_steps", str(steps), "--val_split", "train",
                            "--output_dir", str(output_dir), "--log_interval", "2", "--seed", "1"])
    assert status == 0
    with open(output_dir / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    return losses, eval_record(output_dir)


@pytest.mark.parametrize("task", ["vqa", "retrieval", "referring"])
def test_finetune_trains_saves_and_reloads(task, tasks_dir, tiny_config, ds_config, tmp_path):
    output_dir = tmp_path / task
    losses, record = finetune_from_scratch(task, 4, tasks_dir, tiny_config, ds_config, output_dir)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert 0.0 <= record[METRICS[task]] <= 1.0 and record["eval"] == "train"
    # The saved task model is a fine-tuned checkpoint: evaluation-only reloads it and gets the same number.
    again = tmp_path / f"{task}_eval"
    extra = ["--answers", str(output_dir / "final" / "answers.json")] if task == "vqa" else []
    assert finetune.main(["--task", task, "--init", str(output_dir / "final"), "--data", tasks_dir, "--eval_only",
                          "--deepspeed_config", ds_config, "--val_split", "train", "--output_dir", str(again),
                          *extra]) == 0
    assert eval_record(again)[METRICS[task]] == pytest.approx(record[METRICS[task]])


# Chance levels on the train split of the tiny set (8 images, 16 questions / captions / expressions): VQA, a uniform
# guess over ~30 answers, under 0.05; retrieval R@1 1/8; referring 1/num_objects (3-8 objects), about 0.2.
@pytest.mark.slow
@pytest.mark.parametrize("task, steps, chance", [("vqa", 100, 0.05), ("retrieval", 300, 1 / 8),
                                                 ("referring", 300, 0.25)])
def test_finetune_beats_chance(task, steps, chance, tasks_dir, tiny_config, ds_config, tmp_path):
    losses, record = finetune_from_scratch(task, steps, tasks_dir, tiny_config, ds_config, tmp_path / task)
    assert record[METRICS[task]] > chance + 0.1, record
    assert sum(losses[-5:]) < sum(losses[:5])


def test_zero_shot_retrieval_from_pretraining_checkpoint(tasks_dir, tiny_config, ds_config, tmp_path):
    ViLBERTForPretraining(ViLBERTConfig.from_json(tiny_config)).save_pretrained(tmp_path / "pretrained")
    status = finetune.main(["--task", "retrieval", "--zero_shot", "--init", str(tmp_path / "pretrained"),
                            "--data", tasks_dir, "--deepspeed_config", ds_config, "--output_dir", str(tmp_path / "zs")])
    assert status == 0
    record = eval_record(tmp_path / "zs")
    assert record["zero_shot"] and record["num_images"] == 4 and 0 <= record["image_retrieval_R@1"] <= 1


def test_bad_arguments_fail_clearly(tasks_dir, tiny_config, ds_config, tmp_path, capsys):
    common = ["--data", tasks_dir, "--deepspeed_config", ds_config, "--output_dir", str(tmp_path / "out")]
    assert finetune.main(["--task", "vqa", "--init", str(tmp_path / "nowhere"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert finetune.main(["--task", "vqa", "--zero_shot", "--init", "none", *common]) == 2
    assert "--zero_shot is for --task retrieval" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert finetune.main(["--task", "referring", "--init", "none", "--model", tiny_config, *common[2:],
                          "--data", str(tmp_path / "empty")]) == 2
    assert "no store at" in capsys.readouterr().err
    assert finetune.main(["--task", "referring", "--init", "none", "--model", tiny_config, *common[2:],
                          "--data", str(tmp_path / "empty"), "--features", os.path.join(tasks_dir, "features")]) == 2
    assert "no refs_train.json/.jsonl" in capsys.readouterr().err


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


def test_score_all_pairs_matches_one_pair_at_a_time(tasks_dir):
    """Batching captions over padded image chunks gives each pair the score it gets alone, unpadded."""
    from vilbert.data import open_store
    from vilbert.tasks.common import TaskCollator, encode_regions, encode_text, index_images, model_inputs
    from vilbert.tasks.models import retrieval_score
    from vilbert.tasks.retrieval import load_captions, retrieval_eval_set, score_all_pairs

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
