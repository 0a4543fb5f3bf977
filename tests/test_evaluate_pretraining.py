"""train/evaluate_pretraining.py: held-out pretraining metrics of a checkpoint (tiny random models, a few images)."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from vilbert import SingleStreamForPretraining, ViLBERTConfig, ViLBERTForPretraining
from vilbert.data import NativeStore, PretrainCollator, PretrainDataset, load_tokenizer, write_synthetic
from vilbert.data.synthetic import DEFAULT_NUM_IMAGES, make_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))
import evaluate_pretraining  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module", params=[ViLBERTForPretraining, SingleStreamForPretraining])
def checkpoint(request, tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("pretrained") / request.param.__name__
    torch.manual_seed(0)
    # A wider init than the default 0.02 so that the random model's predictions differ between samples.
    config = ViLBERTConfig.preset("tiny", vocab_size=tokenizer.vocab_size, initializer_range=0.5)
    model = request.param(config)
    # A random model never predicts a masked token; this one answers "a", the captions' most frequent word, so its
    # masked-token accuracy is a fraction of the targets, not 0 (which any count over any total would give).
    (a,) = tokenizer.encode("a", max_len=3)[1:-1]
    with torch.no_grad():
        model.cls.predictions.bias[a] = 100.0
    model.save_pretrained(path)
    return path


def run(capsys, *argv):
    assert evaluate_pretraining.main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_heldout_store_starts_after_the_default_data(tmp_path):
    write_synthetic(tmp_path / "heldout", 2, first_index=DEFAULT_NUM_IMAGES)
    stored = NativeStore(tmp_path / "heldout")[0]
    fresh = make_image(0, DEFAULT_NUM_IMAGES)
    assert stored["image_id"] == fresh["image_id"] == f"synthetic-0-{DEFAULT_NUM_IMAGES}"
    np.testing.assert_allclose(stored["boxes"], fresh["boxes"])


def test_metrics_equal_one_batch_by_hand(checkpoint, capsys, tokenizer, tmp_path):
    """Batches of 3 (uneven: 3 + 3 + 1) give the whole-set counts a single batch of 7 gives by hand."""
    record = run(capsys, "--init", checkpoint, "--num_images", 7, "--batch_size", 3, "--seed", 5)
    write_synthetic(tmp_path / "heldout", 7, first_index=DEFAULT_NUM_IMAGES)
    dataset = PretrainDataset(NativeStore(tmp_path / "heldout"), tokenizer, seed=5)
    batch = PretrainCollator()([dataset[i] for i in range(7)])
    model = (SingleStreamForPretraining if "SingleStream" in checkpoint.name else ViLBERTForPretraining)
    model = model.from_pretrained(checkpoint, backend="torch").eval()
    with torch.no_grad():
        out = model(**batch)
    targets = batch["mlm_labels"][batch["mlm_labels"] != -100]
    assert record["num_images"] == 7 and record["mlm_targets"] == len(targets)
    assert record["masked_regions"] == batch["region_mask"].sum().item()
    assert record["align_acc"] == pytest.approx(out.align_acc.item())
    assert record["mlm_acc"] == pytest.approx(out.mlm_acc.item())
    assert record["region_loss"] == pytest.approx(out.region_loss.item(), rel=1e-5)
    assert 0 < record["mlm_targets"] and 0 < record["masked_regions"] and 0 < record["mlm_acc"] < 1


def test_data_option_reads_the_first_images_of_a_store(checkpoint, capsys, tmp_path):
    write_synthetic(tmp_path / "store", 6, first_index=DEFAULT_NUM_IMAGES)
    from_store = run(capsys, "--init", checkpoint, "--data", tmp_path / "store", "--num_images", 4)
    heldout = run(capsys, "--init", checkpoint, "--num_images", 4)
    assert from_store["num_images"] == 4
    assert {k: v for k, v in from_store.items() if k not in ("data",)} == \
        {k: v for k, v in heldout.items() if k not in ("data",)}


def test_bad_checkpoint_is_one_line(capsys, tmp_path):
    assert evaluate_pretraining.main(["--init", str(tmp_path / "missing")]) == 2
    assert "need a pretraining checkpoint directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--num_images", "0"], "--num_images must be >= 1, got 0"),
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--data", "nowhere"], "--data 'nowhere' does not exist"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_pretraining.main(["--init", "unused", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
