"""`ViLBERTConfig`: every size and switch of the model, with the official config files' field names and meanings.

`ViLBERTConfig.from_json(path)` reads an official config (e.g. `bert_base_6layer_6conect.json`) as is;
`ViLBERTConfig.preset(name)` gives the paper's base model, its depth ablations, and two small models (demos, tests).
"""
import dataclasses
import json
import math
import numbers
import os
from typing import Any, Dict, List

BACKENDS = ("torch", "sdpa", "triton")
POOLING_METHODS = ("mul", "sum")

# Keys of official config files that the official model reads but that change nothing in its computation (or that
# only select code paths this project does not have). They are kept in `extras` and written back by `to_json`.
_OFFICIAL_ACTIVATION_KEYS = ("hidden_act", "v_hidden_act")


def default_backend(on_gpu: bool) -> str:
    """The backend the training scripts use when none is given: the Triton kernels on a GPU; plain PyTorch on the
    CPU, where the kernels run only in Triton's (slow) interpreter."""
    return "triton" if on_gpu else "torch"


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass
class ViLBERTConfig:
    # Text stream: a BERT (the defaults are bert-base-uncased).
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072            # width of the text FFN (also the text FFN of every co-layer)
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02          # std of the normal init of every Linear and Embedding weight
    # Visual stream.
    v_feature_size: int = 2048               # detector region feature size
    v_target_size: int = 1601                # detector classes (1600 Visual Genome + background): region head output
    v_hidden_size: int = 1024
    v_num_hidden_layers: int = 6
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 1024          # width of the visual FFN (also the visual FFN of every co-layer)
    v_hidden_dropout_prob: float = 0.1
    # Also co-attention's: text queries over image keys drop at v_attention_probs_dropout_prob, image queries over
    # text keys at attention_probs_dropout_prob (as the official BertBiAttention's dropout1 / dropout2).
    v_attention_probs_dropout_prob: float = 0.1
    # Co-attention: co-layer i runs after the text layers [.., t_biattention_id[i]) and the visual layers
    # [.., v_biattention_id[i]) have run (ids are exclusive ends; the rest of each stream runs after the last co-layer).
    bi_hidden_size: int = 1024               # co-attention width; also the pooled vectors' size
    bi_num_attention_heads: int = 8
    v_biattention_id: List[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    t_biattention_id: List[int] = dataclasses.field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    pooling_method: str = "mul"              # fusion of pooled_text and pooled_image: "mul" (the paper) or "sum"
    layer_norm_eps: float = 1e-12
    num_answers: int = 3129                  # VQA answer vocabulary (ViLBERTForVQA only)
    # Op implementation: "torch" (plain PyTorch, vilbert_kernels.reference), "sdpa" (torch's fused attention) or
    # "triton" (vilbert_kernels). Same parameters and results up to rounding; not part of the official format.
    backend: str = "torch"
    # Official config keys with no field above (bi_intermediate_size, bi_attention_type, v_initializer_range, ...),
    # kept so that `to_json` writes an official file back unchanged.
    extras: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("v_biattention_id", "t_biattention_id"):
            ids = getattr(self, name)
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"ViLBERTConfig.{name} must be a list of layer ids, got {ids!r}")
            setattr(self, name, list(ids))
        self.validate()

    # ---- validation -------------------------------------------------------------------------------------------------
    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "v_feature_size", "v_target_size", "v_hidden_size",
                     "v_num_hidden_layers", "v_num_attention_heads", "v_intermediate_size", "bi_hidden_size",
                     "bi_num_attention_heads", "num_answers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ViLBERTConfig.{name} must be a positive int, got {value!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "v_hidden_dropout_prob",
                     "v_attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"ViLBERTConfig.{name} must be a number in [0, 1), got {value!r}")
        for name in ("initializer_range", "layer_norm_eps"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ValueError(f"ViLBERTConfig.{name} must be a finite number > 0, got {value!r}")
        for hidden, heads in (("hidden_size", "num_attention_heads"), ("v_hidden_size", "v_num_attention_heads"),
                              ("bi_hidden_size", "bi_num_attention_heads")):
            if getattr(self, hidden) % getattr(self, heads):
                raise ValueError(f"ViLBERTConfig.{hidden}={getattr(self, hidden)} is not a multiple of "
                                 f"{heads}={getattr(self, heads)}")
        v_ids, t_ids = self.v_biattention_id, self.t_biattention_id
        if len(v_ids) != len(t_ids):
            raise ValueError(f"ViLBERTConfig.v_biattention_id {v_ids} and t_biattention_id {t_ids} must have the same "
                             "length (one pair per co-attention layer)")
        for name, ids, num_layers in (("v_biattention_id", v_ids, self.v_num_hidden_layers),
                                      ("t_biattention_id", t_ids, self.num_hidden_layers)):
            if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= num_layers for i in ids):
                raise ValueError(f"ViLBERTConfig.{name}={ids}: every id must be an int in [0, {num_layers}] "
                                 "(the number of layers of that stream)")
            if any(a >= b for a, b in zip(ids, ids[1:])):
                raise ValueError(f"ViLBERTConfig.{name}={ids} must be strictly increasing")
        if self.pooling_method not in POOLING_METHODS:
            raise ValueError(f"ViLBERTConfig.pooling_method must be one of {POOLING_METHODS}, "
                             f"got {self.pooling_method!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"ViLBERTConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    # ---- JSON --------------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ViLBERTConfig":
        """Fields by name; official keys without a field go to `extras` (the activation keys must say "gelu")."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extras"}
        extras = dict(values.get("extras", {}))
        kwargs = {}
        for key, value in values.items():
            if key in names:
                kwargs[key] = value
            elif key in _OFFICIAL_ACTIVATION_KEYS:
                if value != "gelu":
                    raise ValueError(f"config key {key}={value!r} is not supported: ViLBERT uses 'gelu' (exact erf)")
            elif key != "extras":
                extras[key] = value
        return cls(**kwargs, extras=extras)

    @classmethod
    def from_json(cls, path) -> "ViLBERTConfig":
        """Read an official ViLBERT config file (or one written by `to_json`)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ViLBERT config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> Dict[str, Any]:
        """Flat dict in the official layout: fields, then `extras` merged in."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extras"}
        values.update(self.extras)
        return values

    def to_json(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    # ---- presets -----------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ViLBERTConfig":
        """A named configuration, with any field overridden (e.g. `preset("small", vocab_size=tokenizer_size)`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown ViLBERTConfig preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's base model (official bert_base_6layer_6conect.json): 12 text layers, 6 visual, 6 co-layers.
    "vilbert-base": {},
    # The paper's depth ablations: visual layers and co-layer positions change, the text stream stays BERT-base.
    "vilbert-2layer": dict(v_num_hidden_layers=2, v_biattention_id=[0, 1], t_biattention_id=[10, 11]),
    "vilbert-4layer": dict(v_num_hidden_layers=4, v_biattention_id=[0, 1, 2, 3], t_biattention_id=[8, 9, 10, 11]),
    "vilbert-8layer": dict(v_num_hidden_layers=8, v_biattention_id=list(range(8)), t_biattention_id=list(range(4, 12))),
    # The CPU demo (the README's main job): head dim 64 everywhere; the data's real feature and class sizes; the
    # training script sets vocab_size from its tokenizer. Width 128 rather than 256: on 2 CPU cores it takes 2.5x the
    # optimizer steps in the same time, which is what alignment needs to leave chance within minutes.
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512,
                  max_position_embeddings=128, v_hidden_size=128, v_num_hidden_layers=2, v_num_attention_heads=2,
                  v_intermediate_size=128, bi_hidden_size=128, bi_num_attention_heads=2,
                  v_biattention_id=[0, 1], t_biattention_id=[2, 3]),
    # Unit tests: head dim 16, two co-layers, the first after one text layer and no visual layer.
    "tiny": dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64, v_hidden_size=32, v_num_hidden_layers=2, v_num_attention_heads=2,
                 v_intermediate_size=48, bi_hidden_size=32, bi_num_attention_heads=2,
                 v_biattention_id=[0, 1], t_biattention_id=[1, 2], num_answers=7),
}
