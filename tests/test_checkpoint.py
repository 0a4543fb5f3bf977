"""Checkpoints: save/from_pretrained, official ViLBERT state dicts both ways, Hugging Face BERT initialisation."""
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vilbert import (SingleStreamForPretraining, SingleStreamModel, ViLBERTConfig, ViLBERTForPretraining,
                     ViLBERTForVQA, ViLBERTModel)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
ORACLE = SHARED / "official_oracle"
needs_shared = pytest.mark.skipif(not ORACLE.is_dir(), reason=f"official reference data not found at {SHARED}")
WORD = "bert.embeddings.word_embeddings.weight"
DECODER = "cls.predictions.decoder.weight"


def tiny(**overrides):
    return ViLBERTConfig.preset("tiny", **overrides)


def inputs(config, B=2, T=5, V=4):
    g = torch.Generator().manual_seed(0)
    return dict(input_ids=torch.randint(1, config.vocab_size, (B, T), generator=g),
                image_features=torch.randn(B, V, config.v_feature_size, generator=g),
                image_locations=torch.rand(B, V, 5, generator=g),
                text_lens=torch.tensor([T, T - 2]), image_lens=torch.tensor([V - 1, V]))


def random_official_state_dict(model):
    """An official-format state dict for `model`'s config: random tensors under every official key, the dead q_dense
    layers included, the decoder tied to the word embeddings (as the official file stores it)."""
    state = {key: torch.randn(t.shape) for key, t in model.to_official_state_dict().items()}
    if DECODER in state:
        state[DECODER] = state[WORD]
    config = model.config
    for i in range(len(config.v_biattention_id)):
        prefix = f"bert.encoder.c_layer.{i}.biOutput."
        state[prefix + "q_dense1.weight"] = torch.randn(config.v_hidden_size, config.bi_hidden_size)
        state[prefix + "q_dense1.bias"] = torch.randn(config.v_hidden_size)
        state[prefix + "q_dense2.weight"] = torch.randn(config.hidden_size, config.bi_hidden_size)
        state[prefix + "q_dense2.bias"] = torch.randn(config.hidden_size)
    return state


def assert_round_trip(model, official):
    report = model.load_official_state_dict(official)
    dead = {key for key in official if ".q_dense" in key}
    assert sorted(report.skipped) == sorted(dead) and report.missing == [] and report.unexpected == []
    back = model.to_official_state_dict()
    assert set(back) == set(official) - dead
    for key, value in back.items():
        assert torch.equal(value, official[key]), key


# ---- our format -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_class", [ViLBERTForPretraining, ViLBERTForVQA, SingleStreamForPretraining,
                                         ViLBERTModel, SingleStreamModel])
def test_save_and_from_pretrained(tmp_path, model_class):
    model = model_class(tiny()).eval()
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path, backend="sdpa").eval()
    assert loaded.config.backend == "sdpa"
    assert loaded.config == ViLBERTConfig.preset("tiny", backend="sdpa")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        batch = inputs(model.config)
        torch.testing.assert_close(loaded(**batch).pooled_text, model(**batch).pooled_text)
    if hasattr(model, "cls"):
        assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
        assert len(load_file(tmp_path / "model.safetensors")) == len(model.state_dict()) - 1  # tied: stored once


def test_from_pretrained_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ViLBERTForPretraining.from_pretrained(tmp_path / "missing")
    ViLBERTModel(tiny()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit ViLBERTForPretraining.*missing"):
        ViLBERTForPretraining.from_pretrained(tmp_path)


# ---- official ViLBERT -----------------------------------------------------------------------------------------------
@needs_shared
def test_official_oracle_file_round_trip():
    official = torch.load(ORACLE / "pytorch_model.bin")
    model = ViLBERTForPretraining(ViLBERTConfig.from_json(ORACLE / "config.json"))
    assert_round_trip(model, official)


def test_official_state_dict_saved_inside_data_parallel_loads(tmp_path):
    """Every key prefixed `module.` (a model saved wrapped in DataParallel): the prefix is taken off."""
    torch.manual_seed(0)
    source = ViLBERTForPretraining(tiny())
    torch.save({"module." + k: v for k, v in source.to_official_state_dict().items()}, tmp_path / "dp.bin")
    model = ViLBERTForPretraining(tiny())
    model.load_official_state_dict(tmp_path / "dp.bin")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


def test_a_strict_mismatch_names_a_few_keys_and_the_counts():
    """A checkpoint of another model: the error stays readable (a few names and the counts, not every key)."""
    official = ViLBERTForPretraining(tiny()).to_official_state_dict()
    with pytest.raises(ValueError) as error:
        ViLBERTForPretraining(tiny()).load_official_state_dict({"other." + k: v for k, v in official.items()})
    message = str(error.value)
    assert len(message) < 2000 and f"unexpected {len(official)}:" in message and "in all)" in message


@pytest.mark.parametrize("model_class", [ViLBERTForPretraining, ViLBERTForVQA])
def test_official_round_trip_random(model_class):
    torch.manual_seed(0)
    model = model_class(tiny())
    assert_round_trip(model, random_official_state_dict(model))


@needs_shared
@pytest.mark.slow
def test_official_round_trip_random_base_from_key_list():
    """Random tensors under every key of official_vilbert_keys.txt (base size, ~1 GB in bf16)."""
    text = (SHARED / "official_vilbert_keys.txt").read_text().split("## VILBertForVLTasks")[0]
    official = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            official[key] = torch.randn([int(s) for s in shape.strip("[]").split(",")], dtype=torch.bfloat16)
    official[DECODER] = official[WORD]
    with torch.device("meta"):
        model = ViLBERTForPretraining(ViLBERTConfig.preset("vilbert-base"))
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.cls.predictions.decoder.weight = model.bert.embeddings.word_embeddings.weight  # to_empty unties
    assert_round_trip(model, official)


def test_official_load_from_path_and_directory(tmp_path):
    model = ViLBERTForPretraining(tiny())
    official = random_official_state_dict(model)
    torch.save(official, tmp_path / "pytorch_model_9.bin")  # the official checkpoint name pattern
    for source in (tmp_path / "pytorch_model_9.bin", tmp_path):
        model.load_official_state_dict(source)
        assert torch.equal(model.bert.v_pooler.dense.weight, official["bert.v_pooler.dense.weight"])
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        model.load_official_state_dict(tmp_path / "nothing_here.bin")
    torch.save(official, tmp_path / "pytorch_model_19.bin")  # two epochs' checkpoints: which one is meant?
    with pytest.raises(ValueError, match=r"several checkpoints .*pytorch_model_19.bin.*pass the file's path"):
        model.load_official_state_dict(tmp_path)
    # A directory holding our weights and a pytorch_model.bin: ours (save_pretrained's) are read, then the .bin.
    from safetensors.torch import save_file
    from vilbert.checkpoint import read_state_dict
    both = tmp_path / "both"
    both.mkdir()
    save_file({"x": torch.ones(1)}, str(both / "model.safetensors"))
    torch.save({"x": torch.zeros(1)}, both / "pytorch_model.bin")
    assert read_state_dict(both)["x"].item() == 1.0
    (both / "model.safetensors").unlink()
    assert read_state_dict(both)["x"].item() == 0.0


def test_official_load_errors_name_the_key():
    model = ViLBERTForPretraining(tiny())
    official = random_official_state_dict(model)
    before = model.bert.t_pooler.dense.weight.clone()

    missing = {k: v for k, v in official.items() if k != "bert.encoder.v_layer.1.output.dense.bias"}
    with pytest.raises(ValueError, match=r"missing 1: \[bert.encoder.v_layer.1.output.dense.bias\]"):
        model.load_official_state_dict(missing)
    assert torch.equal(model.bert.t_pooler.dense.weight, before)  # a failed strict load changes nothing

    with pytest.raises(ValueError, match=r"'bert.t_pooler.dense.weight' has shape \(32, 31\)"):
        model.load_official_state_dict({**official, "bert.t_pooler.dense.weight": torch.zeros(32, 31)})
    with pytest.raises(ValueError, match=r"unexpected 1: \[vil_logit.weight\]"):
        model.load_official_state_dict({**official, "vil_logit.weight": torch.zeros(1, 32)})
    with pytest.raises(ValueError, match="tied parameter"):
        model.load_official_state_dict({**official, DECODER: torch.randn(official[DECODER].shape)})

    report = model.load_official_state_dict({**missing, "vil_logit.weight": torch.zeros(1, 32)}, strict=False)
    assert report.missing == ["bert.encoder.v_layer.1.output.dense.bias"]
    assert report.unexpected == ["vil_logit.weight"]
    assert torch.equal(model.bert.t_pooler.dense.weight, official["bert.t_pooler.dense.weight"])


def test_official_pretrained_into_backbone_and_task_model():
    """A pretraining checkpoint initialises a task model (its new head reported missing) and the bare backbone."""
    official = random_official_state_dict(ViLBERTForPretraining(tiny()))
    vqa = ViLBERTForVQA(tiny())
    report = vqa.load_official_state_dict(official, strict=False)
    assert sorted(report.missing) == sorted(k for k in vqa.state_dict() if k.startswith("vil_prediction."))
    assert all(k.startswith("cls.") for k in report.unexpected)
    assert torch.equal(vqa.bert.encoder.c_layer[1].biattention.query2.weight,
                       official["bert.encoder.c_layer.1.biattention.query2.weight"])

    backbone = ViLBERTModel(tiny())
    report = backbone.load_official_state_dict(official, strict=False)
    assert report.missing == [] and all(k.startswith("cls.") for k in report.unexpected)
    encoder_keys = {k for k in official if k.startswith("bert.") and "q_dense" not in k}
    assert set(backbone.to_official_state_dict()) == encoder_keys


# ---- Hugging Face BERT ----------------------------------------------------------------------------------------------
def hf_bert_state_dict(config, old_names: bool, prefix: str = "bert."):
    """A BERT-for-pretraining state dict with Hugging Face key names, at the tiny config's text sizes."""
    C, F, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    ln = ("gamma", "beta") if old_names else ("weight", "bias")
    shapes = {"embeddings.word_embeddings.weight": (config.vocab_size, C),
              "embeddings.position_embeddings.weight": (config.max_position_embeddings, C),
              "embeddings.token_type_embeddings.weight": (config.type_vocab_size, C),
              f"embeddings.LayerNorm.{ln[0]}": (C,), f"embeddings.LayerNorm.{ln[1]}": (C,),
              "pooler.dense.weight": (C, C), "pooler.dense.bias": (C,)}
    for i in range(L):
        layer = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[f"{layer}attention.self.{name}.weight"] = (C, C)
            shapes[f"{layer}attention.self.{name}.bias"] = (C,)
        shapes.update({f"{layer}attention.output.dense.weight": (C, C), f"{layer}attention.output.dense.bias": (C,),
                       f"{layer}attention.output.LayerNorm.{ln[0]}": (C,),
                       f"{layer}attention.output.LayerNorm.{ln[1]}": (C,),
                       f"{layer}intermediate.dense.weight": (F, C), f"{layer}intermediate.dense.bias": (F,),
                       f"{layer}output.dense.weight": (C, F), f"{layer}output.dense.bias": (C,),
                       f"{layer}output.LayerNorm.{ln[0]}": (C,), f"{layer}output.LayerNorm.{ln[1]}": (C,)})
    state = {prefix + key: torch.randn(shape) for key, shape in shapes.items()}
    if prefix:  # BertForPreTraining: MLM head and next-sentence head
        state.update({"cls.predictions.bias": torch.randn(config.vocab_size),
                      "cls.predictions.transform.dense.weight": torch.randn(C, C),
                      "cls.predictions.transform.dense.bias": torch.randn(C),
                      f"cls.predictions.transform.LayerNorm.{ln[0]}": torch.randn(C),
                      f"cls.predictions.transform.LayerNorm.{ln[1]}": torch.randn(C),
                      "cls.seq_relationship.weight": torch.randn(2, C), "cls.seq_relationship.bias": torch.randn(2)})
        state[DECODER] = state[prefix + "embeddings.word_embeddings.weight"]
    return state


def test_load_bert_old_names_into_pretraining_model(tmp_path):
    config = tiny()
    bert = hf_bert_state_dict(config, old_names=True)
    torch.save(bert, tmp_path / "pytorch_model.bin")
    model = ViLBERTForPretraining(config)
    report = model.load_bert(tmp_path)
    ours = model.state_dict()
    for key, value in bert.items():
        if key in report.loaded:
            name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
            assert torch.equal(ours[name], value), key
    assert sorted(report.unexpected) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                         "cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    assert len(report.loaded) == len(bert) - 4
    assert report.missing and all(re.match(r"bert\.(v_embeddings|encoder\.(v_layer|c_layer)|t_pooler|v_pooler)|"
                                           r"cls\.(bi_seq|imagePredictions)", k) for k in report.missing)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_load_bert_bare_safetensors_into_backbone(tmp_path):
    config = tiny()
    bert = hf_bert_state_dict(config, old_names=False, prefix="")  # a bare BertModel
    save_file(bert, tmp_path / "model.safetensors")
    model = ViLBERTModel(config)
    report = model.load_bert(tmp_path)
    assert sorted(report.unexpected) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert torch.equal(model.encoder.layer[2].output.LayerNorm.weight, bert["encoder.layer.2.output.LayerNorm.weight"])


@pytest.mark.parametrize("model_class", [ViLBERTModel, SingleStreamModel])
def test_load_bert_from_the_weights_file_into_either_backbone(tmp_path, model_class):
    config = tiny()
    bert = hf_bert_state_dict(config, old_names=False, prefix="")
    save_file(bert, tmp_path / "model.safetensors")
    model = model_class(config)
    report = model.load_bert(tmp_path / "model.safetensors")
    assert sorted(report.unexpected) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert torch.equal(model.encoder.layer[1].attention.self.query.weight,
                       bert["encoder.layer.1.attention.self.query.weight"])


def test_loading_into_meta_tensors_is_refused(tmp_path):
    """copy_ into a meta tensor does nothing, so a load would report every key loaded and load none."""
    config = tiny()
    with torch.device("meta"):
        model = ViLBERTForPretraining(config)
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        model.load_official_state_dict(random_official_state_dict(ViLBERTForPretraining(config)))
    save_file(hf_bert_state_dict(config, old_names=False, prefix=""), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="meta device"):
        model.load_bert(tmp_path)


def test_load_bert_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_bert_here"):
        ViLBERTForPretraining(tiny()).load_bert(tmp_path / "no_bert_here")
    with pytest.raises(FileNotFoundError, match="pytorch_model"):
        ViLBERTForPretraining(tiny()).load_bert(tmp_path)
    torch.save(hf_bert_state_dict(tiny(vocab_size=99), old_names=False), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"'bert.embeddings.word_embeddings.weight' has shape \(99, 32\)"):
        ViLBERTForPretraining(tiny()).load_bert(tmp_path)
    # A shallower BERT, or another model type's names: the text stream would stay (partly) random.
    config = tiny()
    shallow = ViLBERTConfig.from_dict({**config.to_dict(), "num_hidden_layers": config.num_hidden_layers - 1,
                                       "t_biattention_id": [i - 1 for i in config.t_biattention_id]})
    torch.save(hf_bert_state_dict(shallow, old_names=False), tmp_path / "pytorch_model.bin")
    model = ViLBERTForPretraining(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"partly random: \['bert.encoder.layer.{config.num_hidden_layers - 1}\."):
        model.load_bert(tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    roberta = {k.replace("bert.", "roberta.", 1): v for k, v in hf_bert_state_dict(config, old_names=False).items()}
    torch.save(roberta, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="partly random"):
        ViLBERTForPretraining(config).load_bert(tmp_path)
