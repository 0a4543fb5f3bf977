"""Checkpoints: our own format, official ViLBERT state dicts, and Hugging Face BERT weights for the text stream.

`ViLBERTModel` and every model with heads (the single-stream baselines too) mix in `CheckpointMixin`:

    model.save_pretrained(dir)                    # dir/config.json + dir/model.safetensors (tied decoder stored once)
    Model.from_pretrained(dir, backend=None)
    model.load_official_state_dict(sd_or_path)    # official keys (pytorch_model*.bin); q_dense layers skipped
    model.to_official_state_dict()                # back to official keys
    model.load_bert(bert_path)                    # text stream (+ MLM head) from a Hugging Face BERT checkpoint

Our parameter names are the official ones, so the official map is a prefix: a model's key = official key minus
`official_prefix` ("bert." for ViLBERTModel, "" for the models with heads). Anything that does not fit raises an
error naming the key; nothing fails silently.
"""
import dataclasses
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Union

import torch

from .config import ViLBERTConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# The official BertBiOutput's q_dense1/q_dense2 exist in every checkpoint but are never used in its forward.
DEAD_OFFICIAL_KEY = re.compile(r"\.biOutput\.q_dense[12]\.")
# Hugging Face BERT keys without the `bert.` prefix (a bare BertModel) start with these.
_BERT_MODULES = ("embeddings.", "encoder.", "pooler.")
_TEXT_STREAM = re.compile(r"(bert\.)?(embeddings|encoder\.layer)\.")  # what load_bert must fill (our names)


@dataclasses.dataclass
class LoadReport:
    """What a non-strict load did, in the source's key names (missing: the model's names with no source key)."""
    loaded: List[str]
    missing: List[str]
    unexpected: List[str]
    skipped: List[str] = dataclasses.field(default_factory=list)  # known-dead source keys (official q_dense)

    def __str__(self):
        def few(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        return (f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}: [{few(self.missing)}]; "
                f"unexpected {len(self.unexpected)}: [{few(self.unexpected)}]; skipped {len(self.skipped)} dead")


def is_pretrained_dir(path) -> bool:
    """Whether `path` is a directory `save_pretrained` wrote (config + weights), which carries its own config; an
    official checkpoint's directory does not, even with a config.json beside its pytorch_model.bin."""
    return (path is not None and os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))
            and os.path.isfile(os.path.join(path, WEIGHTS_NAME)))


def read_state_dict(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> Mapping[str, torch.Tensor]:
    """A state dict as given, or read from a file (.bin/.pt via torch.load, .safetensors) or a directory holding
    model.safetensors, pytorch_model.bin or one pytorch_model*.bin (the official names). The `module.` prefix that a
    model saved inside DataParallel / DistributedDataParallel puts on every key is taken off."""
    state_dict = _read_state_dict(source)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


def _read_state_dict(source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a state dict or a path, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        candidates = [path / WEIGHTS_NAME, path / "pytorch_model.bin"]
        found = [p for p in candidates if p.is_file()] or sorted(path.glob("pytorch_model*.bin"))
        if len(found) == 0:
            raise FileNotFoundError(f"no {WEIGHTS_NAME} or pytorch_model*.bin in directory {path}")
        if len(found) > 1 and found[0] not in candidates:
            raise ValueError(f"several checkpoints in {path}: {[p.name for p in found]}; pass the file's path")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return state_dict


class CheckpointMixin:
    """Checkpoint methods of the model classes (which define `config` and `official_prefix`)."""
    official_prefix: str = ""

    # ---- our format -------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory):
        from safetensors.torch import save_model
        os.makedirs(directory, exist_ok=True)
        self.config.to_json(os.path.join(directory, CONFIG_NAME))
        save_model(self, os.path.join(directory, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory, backend=None):
        """The model saved by `save_pretrained` (config.backend as saved unless `backend` is given)."""
        from safetensors.torch import load_model
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{cls.__name__}.from_pretrained: {directory / name} not found")
        model = cls(ViLBERTConfig.from_json(directory / CONFIG_NAME), backend=backend)
        missing, unexpected = load_model(model, directory / WEIGHTS_NAME, strict=False)
        if missing or unexpected:
            loaded = [name for name in model.state_dict() if name not in missing]
            raise ValueError(f"{directory / WEIGHTS_NAME} does not fit {cls.__name__}: "
                             f"{LoadReport(loaded, sorted(missing), sorted(unexpected))}")
        return model

    # ---- official ViLBERT --------------------------------------------------------------------------------------------
    def load_official_state_dict(self, source, strict: bool = True) -> LoadReport:
        """Load an official ViLBERT state dict (or its file / directory). Strict: every parameter must be loaded and
        every non-dead key used, else ValueError naming them; non-strict returns the LoadReport instead. A shape
        mismatch is always an error."""
        mapped, unexpected, skipped = {}, [], []
        targets = self.state_dict(keep_vars=True)
        for key, value in read_state_dict(source).items():
            if DEAD_OFFICIAL_KEY.search(key):
                skipped.append(key)
                continue
            ours = key[len(self.official_prefix):] if key.startswith(self.official_prefix) else None
            if ours not in targets:
                unexpected.append(key)
                continue
            _check_shape(key, value, ours, targets[ours])
            mapped[ours] = (key, value)
        missing = _assign(self, mapped, strict, unexpected, what="official ViLBERT")
        return LoadReport([key for key, _ in mapped.values()], [self.official_prefix + k for k in missing],
                          unexpected, skipped)

    def to_official_state_dict(self) -> Dict[str, torch.Tensor]:
        """Our state dict under the official key names (the tied decoder under both of its names, as the official)."""
        return {self.official_prefix + key: value for key, value in self.state_dict().items()}

    # ---- Hugging Face BERT -------------------------------------------------------------------------------------------
    def load_bert(self, bert_path) -> LoadReport:
        """Initialise the text stream (and the MLM head where the model has one) from a Hugging Face BERT checkpoint:
        its directory (pytorch_model.bin or model.safetensors) or that file. Old names (LayerNorm gamma/beta) are
        renamed, a missing `bert.` prefix is added. Returns what was loaded, what the model kept, and what BERT had
        extra (its pooler and next-sentence head: ViLBERT's poolers have other sizes). A shape mismatch is an error,
        and so is a text stream (embeddings, text layers) the checkpoint does not fill: another model type, or fewer
        layers."""
        if not Path(bert_path).exists():
            raise FileNotFoundError(f"BERT checkpoint not found: {bert_path} (expected a directory or a weights "
                                    "file)")
        mapped, unexpected = {}, []
        targets = self.state_dict(keep_vars=True)
        for key, value in read_state_dict(bert_path).items():
            name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
            if name.startswith(_BERT_MODULES):
                name = "bert." + name
            ours = name[len(self.official_prefix):] if name.startswith(self.official_prefix) else None
            if ours not in targets:
                unexpected.append(key)
                continue
            _check_shape(key, value, ours, targets[ours])
            mapped[ours] = (key, value)
        unfilled = [name for name in targets if _TEXT_STREAM.match(name) and name not in mapped]
        if unfilled:
            raise ValueError(f"BERT checkpoint {bert_path} leaves the text stream partly random: {unfilled[:5]} "
                             f"({len(unfilled)} in all) not loaded; it holds {len(mapped)} of the model's tensors and "
                             f"{len(unexpected)} it has no place for (e.g. {unexpected[:3]}); expected a BERT with the "
                             f"config's {self.config.num_hidden_layers} layers")
        missing = _assign(self, mapped, strict=False, unexpected=unexpected, what="BERT")
        return LoadReport([key for key, _ in mapped.values()], missing, unexpected)


def _check_shape(key, value, ours, target):
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"checkpoint key {key!r} has shape {tuple(value.shape)}, but the model's {ours!r} is "
                         f"{tuple(target.shape)}")


def _assign(model, mapped, strict, unexpected, what) -> List[str]:
    """Copy `mapped` (our key -> (source key, tensor)) into the model; returns the model's keys left unloaded.

    Tied parameters (the MLM decoder is the word embedding) count as loaded when any of their names is, and two source
    tensors for one tied parameter must be equal. Nothing is copied when strict and anything is missing or unexpected.
    """
    targets = model.state_dict(keep_vars=True)
    on_meta = [name for name, t in targets.items() if t.is_meta]
    if on_meta:  # copy_ into a meta tensor does nothing: the load would report success and load nothing
        raise ValueError(f"{type(model).__name__} has tensors on the meta device ({on_meta[:3]}, {len(on_meta)} in "
                         "all); give them storage first, e.g. model.to_empty(device='cpu'), then load")
    first_name = {}  # id(tensor) -> its first name in the state dict
    canonical = {name: first_name.setdefault(id(t), name) for name, t in targets.items()}
    chosen = {}  # canonical name -> (source key, tensor)
    for ours, (key, value) in mapped.items():
        canon = canonical[ours]
        if canon in chosen and not torch.equal(chosen[canon][1], value):
            raise ValueError(f"{chosen[canon][0]!r} and {key!r} are one tied parameter in the model ({canon!r}) but "
                             "differ in the checkpoint")
        chosen[canon] = (key, value)
    missing = [name for name in first_name.values() if name not in chosen]
    if strict and (missing or unexpected):
        raise ValueError(f"{what} checkpoint does not fit {type(model).__name__}: "
                         f"{LoadReport(list(chosen), missing, unexpected)} (pass strict=False to load what fits and "
                         "get the report)")
    with torch.no_grad():
        for canon, (_, value) in chosen.items():
            targets[canon].copy_(value)
    return missing
