"""ViLBERTConfig: presets, official JSON files as they are, round trips, and clear errors for bad values."""
import json
from pathlib import Path

import pytest

from vilbert import ViLBERTConfig
from vilbert.config import PRESETS

ORACLE_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_oracle" / "config.json"

# The keys and values of the official config/bert_base_6layer_6conect.json (see shared/reference/official_vilbert.md).
OFFICIAL_BASE = {
    "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 512, "num_attention_heads": 12,
    "num_hidden_layers": 12, "type_vocab_size": 2, "vocab_size": 30522, "v_feature_size": 2048, "v_target_size": 1601,
    "v_hidden_size": 1024, "v_num_hidden_layers": 6, "v_num_attention_heads": 8, "v_intermediate_size": 1024,
    "bi_hidden_size": 1024, "bi_num_attention_heads": 8, "bi_intermediate_size": 1024, "bi_attention_type": 1,
    "v_attention_probs_dropout_prob": 0.1, "v_hidden_act": "gelu", "v_hidden_dropout_prob": 0.1,
    "v_initializer_range": 0.02, "v_biattention_id": [0, 1, 2, 3, 4, 5], "t_biattention_id": [6, 7, 8, 9, 10, 11],
    "pooling_method": "mul",
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    config = ViLBERTConfig.preset(name)
    assert config.v_feature_size == 2048 and config.v_target_size == 1601  # what the data provides
    assert len(config.v_biattention_id) == len(config.t_biattention_id) >= 1


def test_base_preset_is_the_official_base_config(tmp_path):
    path = tmp_path / "bert_base_6layer_6conect.json"
    path.write_text(json.dumps(OFFICIAL_BASE))
    official = ViLBERTConfig.from_json(path)
    assert official.extras == {"bi_intermediate_size": 1024, "bi_attention_type": 1, "v_initializer_range": 0.02}
    assert ViLBERTConfig.preset("vilbert-base", extras=official.extras) == official


def test_depth_ablations():
    for layers, t_first in ((2, 10), (4, 8), (8, 4)):
        config = ViLBERTConfig.preset(f"vilbert-{layers}layer")
        assert config.v_num_hidden_layers == layers and config.num_hidden_layers == 12
        assert config.v_biattention_id == list(range(layers))
        assert config.t_biattention_id == list(range(t_first, 12))


def test_json_round_trip_keeps_official_keys(tmp_path):
    official = tmp_path / "official.json"
    official.write_text(json.dumps(OFFICIAL_BASE))
    config = ViLBERTConfig.from_json(official)
    written = tmp_path / "written.json"
    config.to_json(written)
    assert ViLBERTConfig.from_json(written) == config
    values = json.loads(written.read_text())
    for key, value in OFFICIAL_BASE.items():
        if key not in ("hidden_act", "v_hidden_act"):
            assert values[key] == value, key


@pytest.mark.skipif(not ORACLE_CONFIG.is_file(), reason=f"official reference data not found at {ORACLE_CONFIG}")
def test_reads_the_oracle_config():
    config = ViLBERTConfig.from_json(ORACLE_CONFIG)
    assert (config.hidden_size, config.v_hidden_size, config.bi_hidden_size) == (64, 64, 32)
    assert (config.v_biattention_id, config.t_biattention_id) == ([0, 1], [2, 3])


def test_preset_overrides():
    config = ViLBERTConfig.preset("small", vocab_size=517, backend="sdpa")
    assert config.vocab_size == 517 and config.backend == "sdpa"
    with pytest.raises(ValueError, match="unknown ViLBERTConfig preset 'huge'"):
        ViLBERTConfig.preset("huge")


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=33), "hidden_size=33 is not a multiple of num_attention_heads=2"),
    (dict(bi_num_attention_heads=3), "bi_hidden_size=32 is not a multiple of bi_num_attention_heads=3"),
    (dict(v_biattention_id=[0]), "same length"),
    (dict(t_biattention_id=[1, 4]), r"t_biattention_id=\[1, 4\]: every id must be an int in \[0, 3\]"),
    (dict(v_biattention_id=[-1, 1]), "v_biattention_id"),
    (dict(t_biattention_id=[2, 2]), "strictly increasing"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(pooling_method="max"), "pooling_method"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive int, got 0"),
    (dict(vocab_size=12.5), "vocab_size"),
    (dict(hidden_dropout_prob=1.0), r"hidden_dropout_prob must be a number in \[0, 1\), got 1.0"),
    (dict(hidden_dropout_prob="0.1"), "hidden_dropout_prob must be a number in"),  # a JSON string, say
    (dict(v_attention_probs_dropout_prob=None), "v_attention_probs_dropout_prob must be a number in"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps must be a finite number > 0"),
    (dict(layer_norm_eps="1e-12"), "layer_norm_eps must be a finite number > 0"),
    (dict(initializer_range=float("inf")), "initializer_range must be a finite number > 0"),
    (dict(v_biattention_id=0), "v_biattention_id must be a list of layer ids, got 0"),
])
def test_bad_config_raises_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViLBERTConfig.preset("tiny", **overrides)


def test_unsupported_activation_and_missing_file(tmp_path):
    path = tmp_path / "relu.json"
    path.write_text(json.dumps({**OFFICIAL_BASE, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        ViLBERTConfig.from_json(path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ViLBERTConfig.from_json(tmp_path / "nope.json")
