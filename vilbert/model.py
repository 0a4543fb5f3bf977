"""ViLBERT (Lu et al. 2019): a text BERT and a visual transformer exchanging information through co-attention layers.

Module and parameter names are the official checkpoint's (`bert.encoder.c_layer.0.biattention.query1.weight`, ...),
so loading official weights is a name check (checkpoint.py); the official q_dense layers, never used in its forward,
do not exist here. Ops that a backend can fuse (attention, co-attention, LayerNorm with residual and dropout, bias+GELU)
go through `vilbert.ops` inside the module that owns their parameters, so DeepSpeed ZeRO-3 has gathered them.

Shape legend: B batch, T text tokens, V image regions (region 0 = the IMG token), C hidden size of the stream,
H heads, D head dim, N masked text tokens in the batch.
"""
import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .checkpoint import CheckpointMixin
from .config import ViLBERTConfig

IGNORE_INDEX = -100  # mlm_labels value at positions that are not MLM targets
# The alignment head's classes as the official head learned them: its data labelled a caption of the image 0 (BERT's
# IsNext) and a swapped caption 1, so official checkpoints score pairs the same way here. Batches carry is_aligned
# (1 = the caption belongs to the image); alignment_class maps it onto these classes.
ALIGNED, NOT_ALIGNED = 0, 1


# ---- building blocks ------------------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """LayerNorm(dropout(x) + residual), through the backend; dropout only in training."""

    def __init__(self, config: ViLBERTConfig, size: int, dropout_p: float = 0.0):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.dropout_p = dropout_p

    def forward(self, x, residual=None):
        dropout_p = self.dropout_p if self.training else 0.0
        return ops.get(self.config.backend).layer_norm(x, self.weight, self.bias, self.config.layer_norm_eps,
                                                       residual, dropout_p)


class LinearGELU(nn.Linear):
    """GELU(x W^T + b): the matmul without bias, then one fused bias + GELU (same parameters as nn.Linear)."""

    def __init__(self, config: ViLBERTConfig, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.config = config

    def forward(self, x):
        return ops.get(self.config.backend).bias_gelu(F.linear(x, self.weight), self.bias)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the real positions of one stream (official `attention.self`)."""

    def __init__(self, config: ViLBERTConfig, hidden_size: int, num_heads: int, dropout_p: float):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.dropout_p = dropout_p
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, lens):
        B, L, C = x.shape
        q, k, v = (proj(x).view(B, L, self.num_heads, C // self.num_heads)  # (B, L, H, D)
                   for proj in (self.query, self.key, self.value))
        dropout_p = self.dropout_p if self.training else 0.0
        out = ops.get(self.config.backend).attention(q, k, v, lens, lens, dropout_p)
        return out.reshape(B, L, C)  # (B, L, H*D)


class Output(nn.Module):
    """LayerNorm(dropout(dense(h)) + residual): the BERT sub-layer output (official `output` / `attention.output`)."""

    def __init__(self, config: ViLBERTConfig, in_features: int, out_features: int, dropout_p: float):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)
        self.LayerNorm = LayerNorm(config, out_features, dropout_p)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h), residual)


class Intermediate(nn.Module):
    def __init__(self, config: ViLBERTConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense = LinearGELU(config, hidden_size, intermediate_size)

    def forward(self, x):
        return self.dense(x)


class Attention(nn.Module):
    def __init__(self, config: ViLBERTConfig, hidden_size: int, num_heads: int, attn_dropout: float,
                 hidden_dropout: float):
        super().__init__()
        self.self = SelfAttention(config, hidden_size, num_heads, attn_dropout)
        self.output = Output(config, hidden_size, hidden_size, hidden_dropout)

    def forward(self, x, lens):
        return self.output(self.self(x, lens), x)


class Layer(nn.Module):
    """The post-LN BERT layer: self-attention block, then FFN block, each with residual + LayerNorm."""

    def __init__(self, config: ViLBERTConfig, hidden_size: int, num_heads: int, intermediate_size: int,
                 attn_dropout: float, hidden_dropout: float):
        super().__init__()
        self.attention = Attention(config, hidden_size, num_heads, attn_dropout, hidden_dropout)
        self.intermediate = Intermediate(config, hidden_size, intermediate_size)
        self.output = Output(config, intermediate_size, hidden_size, hidden_dropout)

    def forward(self, x, lens):
        x = self.attention(x, lens)
        return self.output(self.intermediate(x), x)


def text_layer(config: ViLBERTConfig) -> Layer:
    return Layer(config, config.hidden_size, config.num_attention_heads, config.intermediate_size,
                 config.attention_probs_dropout_prob, config.hidden_dropout_prob)


def image_layer(config: ViLBERTConfig) -> Layer:
    return Layer(config, config.v_hidden_size, config.v_num_attention_heads, config.v_intermediate_size,
                 config.v_attention_probs_dropout_prob, config.v_hidden_dropout_prob)


class BiAttention(nn.Module):
    """Co-attention: text queries attend to image keys/values and image queries to text, in one `co_attention` call.

    Official names: *1 projections read the image stream, *2 projections the text stream.
    """

    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.bi_num_attention_heads
        bi = config.bi_hidden_size
        self.query1 = nn.Linear(config.v_hidden_size, bi)
        self.key1 = nn.Linear(config.v_hidden_size, bi)
        self.value1 = nn.Linear(config.v_hidden_size, bi)
        self.query2 = nn.Linear(config.hidden_size, bi)
        self.key2 = nn.Linear(config.hidden_size, bi)
        self.value2 = nn.Linear(config.hidden_size, bi)

    def forward(self, image, image_lens, text, text_lens):
        B, V, _ = image.shape
        T = text.shape[1]
        H, D = self.num_heads, self.config.bi_hidden_size // self.num_heads
        image_q, image_k, image_v = (p(image).view(B, V, H, D) for p in (self.query1, self.key1, self.value1))
        text_q, text_k, text_v = (p(text).view(B, T, H, D) for p in (self.query2, self.key2, self.value2))
        # As the official: text queries' probabilities over image keys drop at v_attention_probs_dropout_prob, image
        # queries' over text keys at attention_probs_dropout_prob. One launch when they agree (every official config).
        text_p, image_p = ((self.config.v_attention_probs_dropout_prob, self.config.attention_probs_dropout_prob)
                           if self.training else (0.0, 0.0))
        backend = ops.get(self.config.backend)
        if text_p == image_p:
            text_ctx, image_ctx = backend.co_attention(text_q, text_k, text_v, image_q, image_k, image_v, text_lens,
                                                       image_lens, text_p)
        else:
            text_ctx = backend.attention(text_q, image_k, image_v, text_lens, image_lens, text_p)
            image_ctx = backend.attention(image_q, text_k, text_v, image_lens, text_lens, image_p)
        return text_ctx.reshape(B, T, H * D), image_ctx.reshape(B, V, H * D)  # (B, T, bi), (B, V, bi)


class BiOutput(nn.Module):
    """Project each co-attention context back to its stream, residual + LayerNorm (official `biOutput`)."""

    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        self.dense1 = nn.Linear(config.bi_hidden_size, config.v_hidden_size)
        self.LayerNorm1 = LayerNorm(config, config.v_hidden_size, config.v_hidden_dropout_prob)
        self.dense2 = nn.Linear(config.bi_hidden_size, config.hidden_size)
        self.LayerNorm2 = LayerNorm(config, config.hidden_size, config.hidden_dropout_prob)

    def forward(self, image_ctx, image, text_ctx, text):
        return self.LayerNorm1(self.dense1(image_ctx), image), self.LayerNorm2(self.dense2(text_ctx), text)


class ConnectionLayer(nn.Module):
    """The co-TRM layer (official `c_layer`): co-attention, then each stream's own FFN. No self-attention."""

    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        self.biattention = BiAttention(config)
        self.biOutput = BiOutput(config)
        self.v_intermediate = Intermediate(config, config.v_hidden_size, config.v_intermediate_size)
        self.v_output = Output(config, config.v_intermediate_size, config.v_hidden_size, config.v_hidden_dropout_prob)
        self.t_intermediate = Intermediate(config, config.hidden_size, config.intermediate_size)
        self.t_output = Output(config, config.intermediate_size, config.hidden_size, config.hidden_dropout_prob)

    def forward(self, image, image_lens, text, text_lens):
        text_ctx, image_ctx = self.biattention(image, image_lens, text, text_lens)
        image, text = self.biOutput(image_ctx, image, text_ctx, text)
        image = self.v_output(self.v_intermediate(image), image)
        text = self.t_output(self.t_intermediate(text), text)
        return image, text


class Encoder(nn.Module):
    """The two streams, interleaved as the official encoder: before co-layer i, the text layers up to (excluding)
    t_biattention_id[i] and the visual layers up to v_biattention_id[i] run; after the last one, the rest.

    The layers of a stream before the first co-layer see that stream only: `text_prefix` and `image_prefix` run them,
    `fuse` runs everything from the first co-layer on, and forward is their composition. Scoring many pairs (retrieval
    evaluation) thus runs each caption's and each image's prefix once and only `fuse` per pair.
    """

    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(text_layer(config) for _ in range(config.num_hidden_layers))
        self.v_layer = nn.ModuleList(image_layer(config) for _ in range(config.v_num_hidden_layers))
        self.c_layer = nn.ModuleList(ConnectionLayer(config) for _ in config.v_biattention_id)
        # Each stream's prefix: its layers before the first co-layer (all of them when there is no co-layer).
        self.num_text_prefix_layers = (config.t_biattention_id + [config.num_hidden_layers])[0]
        self.num_image_prefix_layers = (config.v_biattention_id + [config.v_num_hidden_layers])[0]

    def text_prefix(self, text, text_lens):
        """text (B, T, hidden_size) embeddings -> (B, T, hidden_size) after the text-only layers."""
        for layer in self.layer[:self.num_text_prefix_layers]:
            text = layer(text, text_lens)
        return text

    def image_prefix(self, image, image_lens):
        """image (B, V, v_hidden_size) embeddings -> (B, V, v_hidden_size) after the image-only layers."""
        for layer in self.v_layer[:self.num_image_prefix_layers]:
            image = layer(image, image_lens)
        return image

    def fuse(self, text, image, text_lens, image_lens):
        """The prefixes' outputs -> (text (B, T, hidden_size), image (B, V, v_hidden_size)) of the last layers:
        co-layer i, then each stream's layers up to the next co-layer (after the last one, to the stream's end)."""
        t_ids, v_ids = self.config.t_biattention_id, self.config.v_biattention_id
        segments = zip(self.c_layer, t_ids, t_ids[1:] + [len(self.layer)], v_ids, v_ids[1:] + [len(self.v_layer)])
        for c_layer, t_start, t_end, v_start, v_end in segments:
            image, text = c_layer(image, image_lens, text, text_lens)
            for layer in self.v_layer[v_start:v_end]:
                image = layer(image, image_lens)
            for layer in self.layer[t_start:t_end]:
                text = layer(text, text_lens)
        return text, image

    def forward(self, text, image, text_lens, image_lens):
        """Embeddings text (B, T, hidden_size), image (B, V, v_hidden_size) -> the last layers' (text, image)."""
        return self.fuse(self.text_prefix(text, text_lens), self.image_prefix(image, image_lens), text_lens, image_lens)


class TextEmbeddings(nn.Module):
    """BERT embeddings: word + position + token type, LayerNorm, dropout (official `embeddings`)."""

    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + \
            self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class ImageEmbeddings(nn.Module):
    """Region feature and 5-d location, each projected, summed, LayerNorm, dropout (official `v_embeddings`)."""

    def __init__(self, config: ViLBERTConfig, hidden_size: int):
        super().__init__()
        self.image_embeddings = nn.Linear(config.v_feature_size, hidden_size)
        self.image_location_embeddings = nn.Linear(5, hidden_size)
        self.LayerNorm = LayerNorm(config, hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, image_features, image_locations):
        # The data is float32; a model trained in bf16/fp16 (DeepSpeed casts the weights) takes it in its own dtype.
        dtype = self.image_embeddings.weight.dtype
        x = self.image_embeddings(image_features.to(dtype)) + \
            self.image_location_embeddings(image_locations.to(dtype))
        return self.dropout(self.LayerNorm(x))


class Pooler(nn.Module):
    """ReLU(dense(h[:, 0])): the [CLS] token for text, the IMG token for the image."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)

    def forward(self, hidden):
        return F.relu(self.dense(hidden[:, 0]))


def init_weights(module: nn.Module, std: float):
    """The official init: N(0, std) for Linear and Embedding weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, (LayerNorm, nn.LayerNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _with_backend(config: ViLBERTConfig, backend: Optional[str]) -> ViLBERTConfig:
    """The model's own copy of the config, with `backend` (when given) replacing config.backend."""
    if not isinstance(config, ViLBERTConfig):
        raise TypeError(f"config must be a ViLBERTConfig, got {type(config).__name__}")
    config = dataclasses.replace(config, backend=config.backend if backend is None else backend)
    ops.get(config.backend)  # load the backend now: a first import inside forward would break torch.compile's graph
    return config


def _fail(name, tensor, expected):
    seen = f"shape {tuple(tensor.shape)} {tensor.dtype}" if torch.is_tensor(tensor) else type(tensor).__name__
    raise ValueError(f"{name}: expected {expected}, got {seen}")


def _check_lens(name, lens, B):
    if lens is not None and (not torch.is_tensor(lens) or tuple(lens.shape) != (B,)
                             or lens.dtype not in (torch.int32, torch.int64)):
        _fail(name, lens, f"(B={B},) int32/int64 tensor of lengths (padding at the end)")


def _check_text(config, input_ids, token_type_ids, text_lens):
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        _fail("input_ids", input_ids, "(B, T) int64 tensor")
    B, T = input_ids.shape
    if T > config.max_position_embeddings:
        raise ValueError(f"input_ids: {T} tokens exceed max_position_embeddings={config.max_position_embeddings}")
    if token_type_ids is not None and (not torch.is_tensor(token_type_ids) or token_type_ids.shape != input_ids.shape
                                       or token_type_ids.dtype != torch.long):
        _fail("token_type_ids", token_type_ids, f"(B={B}, T={T}) int64 tensor like input_ids")
    _check_lens("text_lens", text_lens, B)


def _check_image(config, image_features, image_locations, image_lens, B=None):
    """B: the batch size the image inputs must have (None: any)."""
    if (not torch.is_tensor(image_features) or image_features.dim() != 3 or B not in (None, image_features.shape[0])
            or image_features.shape[2] != config.v_feature_size or not image_features.is_floating_point()):
        batch = "B" if B is None else f"B={B}"
        _fail("image_features", image_features, f"({batch}, V, v_feature_size={config.v_feature_size}) float tensor")
    B, V = image_features.shape[:2]
    if not torch.is_tensor(image_locations) or tuple(image_locations.shape) != (B, V, 5):
        _fail("image_locations", image_locations, f"shape (B={B}, V={V}, 5)")
    _check_lens("image_lens", image_lens, B)


def _check_inputs(config, input_ids, image_features, image_locations, token_type_ids, text_lens, image_lens):
    """Shapes and dtypes at the public boundary (no values: that would need a host sync)."""
    _check_text(config, input_ids, token_type_ids, text_lens)
    _check_image(config, image_features, image_locations, image_lens, B=input_ids.shape[0])


def _check_streams(config, text, image, text_lens, image_lens):
    """The inputs of fuse_streams: the two prefixes' hidden states of the same B pairs."""
    if not torch.is_tensor(text) or text.dim() != 3 or text.shape[2] != config.hidden_size:
        _fail("text", text, f"(B, T, hidden_size={config.hidden_size}) tensor from encode_text")
    B = text.shape[0]
    if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != B or image.shape[2] != config.v_hidden_size:
        _fail("image", image, f"(B={B}, V, v_hidden_size={config.v_hidden_size}) tensor from encode_image")
    _check_lens("text_lens", text_lens, B)
    _check_lens("image_lens", image_lens, B)


# ---- outputs ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ViLBERTOutput:
    text_hidden: torch.Tensor   # (B, T, hidden_size), last layer of the text stream
    image_hidden: torch.Tensor  # (B, V, v_hidden_size), last layer of the visual stream
    pooled_text: torch.Tensor   # (B, bi_hidden_size), from [CLS]
    pooled_image: torch.Tensor  # (B, bi_hidden_size), from the IMG token


@dataclasses.dataclass
class PretrainingOutput(ViLBERTOutput):
    # With mlm_labels: (N, vocab_size), one row per target token (mlm_labels != -100) in row-major (b, t) order.
    # Without: (B, T, vocab_size), every position.
    mlm_logits: torch.Tensor
    # With region_mask: (N, v_target_size), one row per masked region in row-major (b, v) order. Without: (B, V, ...).
    region_logits: torch.Tensor
    align_logits: torch.Tensor   # (B, 2); index ALIGNED (0) = the caption belongs to the image, as the official head
    loss: Optional[torch.Tensor] = None         # sum of the losses whose labels were given
    mlm_loss: Optional[torch.Tensor] = None     # CE averaged over target tokens (0 when there are none)
    region_loss: Optional[torch.Tensor] = None  # KL(target || softmax(pred)) summed over classes, mean over masked
    align_loss: Optional[torch.Tensor] = None   # CE averaged over the batch
    mlm_acc: Optional[torch.Tensor] = None      # for logging, no gradient
    align_acc: Optional[torch.Tensor] = None


@dataclasses.dataclass
class TaskOutput(ViLBERTOutput):
    logits: torch.Tensor  # VQA (B, num_answers); retrieval (B,); referring (B, V)
    loss: Optional[torch.Tensor] = None


# ---- the two-stream model -------------------------------------------------------------------------------------------
class ViLBERTModel(CheckpointMixin, nn.Module):
    """Embeddings, the interleaved encoder and the two poolers (official `bert`)."""
    official_prefix = "bert."

    def __init__(self, config: ViLBERTConfig, backend: Optional[str] = None):
        super().__init__()
        self.config = config = _with_backend(config, backend)
        self.image_hidden_size = config.v_hidden_size
        self.embeddings = TextEmbeddings(config)
        self.v_embeddings = ImageEmbeddings(config, config.v_hidden_size)
        self.encoder = Encoder(config)
        self.t_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.v_pooler = Pooler(config.v_hidden_size, config.bi_hidden_size)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids, image_features, image_locations, token_type_ids=None, text_lens=None,
                image_lens=None) -> ViLBERTOutput:
        """input_ids (B, T) int64; image_features (B, V, v_feature_size), region 0 = IMG token; image_locations
        (B, V, 5); token_type_ids (B, T) (default zeros); text_lens, image_lens (B,) real lengths, padding at the end
        (default: everything is real). Outputs at padded positions are unspecified."""
        _check_inputs(self.config, input_ids, image_features, image_locations, token_type_ids, text_lens, image_lens)
        text = self.encode_text(input_ids, token_type_ids, text_lens)
        image = self.encode_image(image_features, image_locations, image_lens)
        return self.fuse_streams(text, image, text_lens, image_lens)

    # forward in three stages: the text side and the image side before the first co-layer depend on one stream only,
    # so scoring every caption against every image (retrieval) runs them once per caption / image.
    def encode_text(self, input_ids, token_type_ids=None, text_lens=None) -> torch.Tensor:
        """Text embeddings and the text layers before the first co-layer. Inputs as forward's; returns the text
        hidden states (B, T, hidden_size) for fuse_streams."""
        _check_text(self.config, input_ids, token_type_ids, text_lens)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.encoder.text_prefix(self.embeddings(input_ids, token_type_ids), text_lens)

    def encode_image(self, image_features, image_locations, image_lens=None) -> torch.Tensor:
        """Region embeddings and the visual layers before the first co-layer. Inputs as forward's; returns the image
        hidden states (B, V, v_hidden_size) for fuse_streams."""
        _check_image(self.config, image_features, image_locations, image_lens)
        return self.encoder.image_prefix(self.v_embeddings(image_features, image_locations), image_lens)

    def fuse_streams(self, text, image, text_lens=None, image_lens=None) -> ViLBERTOutput:
        """The rest of forward for B (caption, image) pairs: the co-layers, the layers after them and the poolers.

        text (B, T, hidden_size) from encode_text, image (B, V, v_hidden_size) from encode_image, text_lens and
        image_lens (B,) as given to them. One caption against B images may come as text.expand(B, -1, -1) (a view),
        its lengths likewise."""
        _check_streams(self.config, text, image, text_lens, image_lens)
        text, image = self.encoder.fuse(text, image, text_lens, image_lens)
        return ViLBERTOutput(text, image, self.t_pooler(text), self.v_pooler(image))


# ---- pretraining ----------------------------------------------------------------------------------------------------
class PredictionHeadTransform(nn.Module):
    """dense, GELU, LayerNorm (official `transform`)."""

    def __init__(self, config: ViLBERTConfig, hidden_size: int):
        super().__init__()
        self.dense = LinearGELU(config, hidden_size, hidden_size)
        self.LayerNorm = LayerNorm(config, hidden_size)

    def forward(self, x):
        return self.LayerNorm(self.dense(x))


class LMPredictionHead(nn.Module):
    """MLM head; `decoder.weight` is the word-embedding Parameter itself (tied by the owner), the bias is separate."""

    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        self.transform = PredictionHeadTransform(config, config.hidden_size)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x):
        return self.decoder(self.transform(x)) + self.bias


class ImagePredictionHead(nn.Module):
    """Masked-region head over the detector's v_target_size classes."""

    def __init__(self, config: ViLBERTConfig, hidden_size: int):
        super().__init__()
        self.transform = PredictionHeadTransform(config, hidden_size)
        self.decoder = nn.Linear(hidden_size, config.v_target_size)

    def forward(self, x):
        return self.decoder(self.transform(x))


class PretrainingHeads(nn.Module):
    """Official `cls`: MLM, alignment (on the fused pooled vectors) and masked-region heads."""

    def __init__(self, config: ViLBERTConfig, image_hidden_size: int):
        super().__init__()
        self.predictions = LMPredictionHead(config)
        self.bi_seq_relationship = nn.Linear(config.bi_hidden_size, 2)
        self.imagePredictions = ImagePredictionHead(config, image_hidden_size)


def fuse_pooled(config: ViLBERTConfig, pooled_text, pooled_image):
    """The joint vector of the pair: elementwise product ("mul", the paper) or sum."""
    return pooled_text * pooled_image if config.pooling_method == "mul" else pooled_text + pooled_image


def region_kl_loss(region_logits, region_targets):
    """KL(target || softmax(logits)) summed over classes, averaged over the N masked regions (0 when N = 0).
    region_logits, region_targets (N, v_target_size)."""
    log_probs = F.log_softmax(region_logits.float(), dim=-1)
    targets = region_targets.float()
    kl = (torch.xlogy(targets, targets) - targets * log_probs).sum(-1)  # (N,); 0 log 0 = 0
    return kl.sum() / max(len(kl), 1)


class ViLBERTForPretraining(CheckpointMixin, nn.Module):
    """ViLBERT with its three pretraining objectives. `out = model(**batch)`; `out.loss` is their equal-weight sum."""
    official_prefix = ""
    encoder_class = ViLBERTModel

    def __init__(self, config: ViLBERTConfig, backend: Optional[str] = None):
        super().__init__()
        self.bert = self.encoder_class(config, backend)
        self.config = config = self.bert.config  # one config object per model: `model.config.backend` switches all
        self.cls = PretrainingHeads(config, self.bert.image_hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.cls.apply(lambda m: init_weights(m, config.initializer_range))
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, image_features, image_locations, token_type_ids=None, text_lens=None,
                image_lens=None, mlm_labels=None, region_targets=None, region_mask=None,
                is_aligned=None) -> PretrainingOutput:
        """Inputs as ViLBERTModel.forward; labels (each optional, its loss computed when given): mlm_labels (B, T)
        int64 with -100 at non-targets; region_mask (B, V) bool (True = masked region = target) with region_targets,
        the targets' class distributions: (B, V, v_target_size) (the official layout; rows off the mask are ignored)
        or (M, v_target_size), one row per True of region_mask in row-major (b, v) order (PretrainCollator's);
        is_aligned (B,) int64 (1 = the caption belongs to the image)."""
        B, T = input_ids.shape
        V = image_features.shape[1]
        _check_labels(B, T, V, self.config.v_target_size, mlm_labels, region_targets, region_mask, is_aligned)
        out = self.bert(input_ids, image_features, image_locations, token_type_ids, text_lens, image_lens)
        # The MLM targets' (b, t) positions in row-major order: one host sync (nonzero), after the encoder is queued.
        is_target = None if mlm_labels is None else (mlm_labels != IGNORE_INDEX).nonzero(as_tuple=True)
        targets = None if mlm_labels is None else mlm_labels[is_target]  # (N,)
        _check_label_values(targets, self.config.vocab_size, is_aligned)

        text_for_mlm = out.text_hidden if mlm_labels is None else out.text_hidden[is_target]
        mlm_logits = self.cls.predictions(text_for_mlm)  # (N, vocab) or (B, T, vocab)
        # The heads run on the targets only when labels are given: most tokens and regions are not targets.
        image_for_region = out.image_hidden if region_mask is None else out.image_hidden[region_mask]
        region_logits = self.cls.imagePredictions(image_for_region)  # (N, v_target_size) or (B, V, v_target_size)
        align_logits = self.alignment_logits(out)  # (B, 2)

        losses = {}
        if mlm_labels is not None:
            losses["mlm_loss"] = F.cross_entropy(mlm_logits.float(), targets, reduction="sum") / max(len(targets), 1)
        if region_targets is not None:
            if region_targets.dim() == 3:
                region_targets = region_targets[region_mask]
            if len(region_targets) != len(region_logits):  # both lengths are known on the host by now
                raise ValueError(f"region_targets has {len(region_targets)} rows but region_mask selects "
                                 f"{len(region_logits)} regions; expected one row per masked region")
            losses["region_loss"] = region_kl_loss(region_logits, region_targets)
        if is_aligned is not None:
            losses["align_loss"] = F.cross_entropy(align_logits.float(), alignment_class(is_aligned))
        metrics = {}
        with torch.no_grad():
            if mlm_labels is not None:
                metrics["mlm_acc"] = (mlm_logits.argmax(-1) == targets).float().mean() if len(targets) else None
            if is_aligned is not None:
                metrics["align_acc"] = (align_logits.argmax(-1) == alignment_class(is_aligned)).float().mean()
        loss = sum(losses.values()) if losses else None
        return PretrainingOutput(**vars(out), mlm_logits=mlm_logits, region_logits=region_logits,
                                 align_logits=align_logits, loss=loss, **losses, **metrics)

    def alignment_logits(self, out: ViLBERTOutput) -> torch.Tensor:
        """The alignment head on an encoder output: (B, 2) logits, index ALIGNED = the caption belongs to the image."""
        return self.cls.bi_seq_relationship(self.dropout(fuse_pooled(self.config, out.pooled_text, out.pooled_image)))


def alignment_class(is_aligned: torch.Tensor) -> torch.Tensor:
    """(B,) is_aligned (1 = the caption belongs to the image, 0 = a swapped caption) -> the head's class (B,) int64."""
    return torch.where(is_aligned == 1, ALIGNED, NOT_ALIGNED)


def pretraining_hits(out: PretrainingOutput, mlm_labels: torch.Tensor, is_aligned: torch.Tensor):
    """A labelled batch's counts, as 0-d int64 tensors on its device (sums, which windows and datasets add up exactly):
    (masked tokens predicted right, masked tokens, pairs whose alignment is predicted right)."""
    is_target = mlm_labels != IGNORE_INDEX
    mlm_hits = (out.mlm_logits.argmax(-1) == mlm_labels[is_target]).sum()  # mlm_logits: a row per target, (b, t) order
    align_hits = (out.align_logits.argmax(-1) == alignment_class(is_aligned)).sum()
    return mlm_hits, is_target.sum(), align_hits


def alignment_log_odds(align_logits: torch.Tensor) -> torch.Tensor:
    """(B, 2) alignment logits -> (B,) log-odds that the caption belongs to the image."""
    return align_logits[:, ALIGNED] - align_logits[:, NOT_ALIGNED]


def _check_label_values(mlm_targets, vocab_size, is_aligned):
    """ValueError for an MLM target outside the vocabulary (the official data marks non-targets -1, ours -100) or an
    is_aligned other than 0/1. One host read, right after the one selecting the MLM targets (so the GPU has nothing
    queued that it would wait for); skipped under torch.compile, where it would break the graph."""
    if torch.compiler.is_compiling():
        return
    checks = {}
    if mlm_targets is not None:
        checks["mlm"] = ((mlm_targets < 0) | (mlm_targets >= vocab_size)).any()
    if is_aligned is not None:
        checks["aligned"] = ((is_aligned != 0) & (is_aligned != 1)).any()
    if not checks:
        return
    bad = dict(zip(checks, torch.stack(list(checks.values())).tolist()))
    if bad.get("mlm"):
        raise ValueError(f"mlm_labels: expected {IGNORE_INDEX} at non-targets and token ids in [0, {vocab_size}) at "
                         f"targets, got values in [{int(mlm_targets.min())}, {int(mlm_targets.max())}] (the official "
                         f"data marks non-targets -1)")
    if bad.get("aligned"):
        raise ValueError(f"is_aligned: expected 0 or 1, got {sorted(set(is_aligned.tolist()))[:5]}")


def _check_labels(B, T, V, num_classes, mlm_labels, region_targets, region_mask, is_aligned):
    def check(name, tensor, shape, dtypes):
        if tensor is not None and (not torch.is_tensor(tensor) or tuple(tensor.shape) != shape
                                   or tensor.dtype not in dtypes):
            seen = f"shape {tuple(tensor.shape)} {tensor.dtype}" if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(f"{name}: expected shape {shape} of {[str(d) for d in dtypes]}, got {seen}")

    floats = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    check("mlm_labels", mlm_labels, (B, T), (torch.int64,))
    compact = torch.is_tensor(region_targets) and region_targets.dim() == 2  # (M, C): a row per masked region
    check("region_targets", region_targets, (len(region_targets), num_classes) if compact else (B, V, num_classes),
          floats)
    check("region_mask", region_mask, (B, V), (torch.bool,))
    check("is_aligned", is_aligned, (B,), (torch.int64,))
    if (region_targets is None) != (region_mask is None):
        raise ValueError("region_targets and region_mask come together: give both or neither")


# ---- task heads (official vilbert-multi-task names, so its task checkpoints load) -----------------------------------
class _TaskModel(CheckpointMixin, nn.Module):
    """The encoder (`encoder_class`: ViLBERTModel, or SingleStreamModel for the single-stream variants) + dropout;
    subclasses add one head and call `_init_head`."""
    official_prefix = ""
    encoder_class = ViLBERTModel

    def __init__(self, config: ViLBERTConfig, backend: Optional[str] = None):
        super().__init__()
        self.bert = self.encoder_class(config, backend)
        self.config = config = self.bert.config  # one config object per model: `model.config.backend` switches all
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _init_head(self, head: nn.Module):
        head.apply(lambda m: init_weights(m, self.config.initializer_range))

    def _joint(self, out: ViLBERTOutput):
        return self.dropout(fuse_pooled(self.config, out.pooled_text, out.pooled_image))  # (B, bi_hidden_size)


def _check_scores(name, scores, shape):
    if not torch.is_tensor(scores) or tuple(scores.shape) != shape:
        seen = f"shape {tuple(scores.shape)}" if torch.is_tensor(scores) else type(scores).__name__
        raise ValueError(f"{name}: expected a tensor of shape {shape}, got {seen}")


def _check_choice_labels(labels, batch):
    """(groups,) int64, each group >= 2 consecutive pairs of the batch (one pair per group would make the loss 0),
    every label an index into its group."""
    if (not torch.is_tensor(labels) or labels.dim() != 1 or labels.dtype != torch.int64 or len(labels) == 0
            or batch % len(labels) or batch // len(labels) < 2):
        seen = f"shape {tuple(labels.shape)} {labels.dtype}" if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"choice_labels: expected (groups,) int64 with the batch of {batch} pairs in groups of at "
                         f"least 2 (the right pair's index in each group), got {seen}")
    if torch.compiler.is_compiling():
        return  # the range check reads the labels on the host: a graph break
    low, high = torch.stack(labels.aminmax()).tolist()  # one host read
    if low < 0 or high >= batch // len(labels):
        raise ValueError(f"choice_labels: expected indices in [0, {batch // len(labels)}) (pairs per group), "
                         f"got values in [{low}, {high}]")


class SimpleClassifier(nn.Module):
    """Linear(bi, 2 bi), GELU, LayerNorm, Linear(2 bi, num_answers) (official `vil_prediction`)."""

    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        hidden = 2 * config.bi_hidden_size
        self.logit_fc = nn.Sequential(nn.Linear(config.bi_hidden_size, hidden), nn.GELU(), LayerNorm(config, hidden),
                                      nn.Linear(hidden, config.num_answers))

    def forward(self, x):
        return self.logit_fc(x)


class ViLBERTForVQA(_TaskModel):
    """VQA as multi-label classification over config.num_answers answers (3129 for VQA 2.0)."""

    def __init__(self, config: ViLBERTConfig, backend: Optional[str] = None):
        super().__init__(config, backend)
        self.vil_prediction = SimpleClassifier(self.config)
        self._init_head(self.vil_prediction)

    def forward(self, input_ids, image_features, image_locations, token_type_ids=None, text_lens=None,
                image_lens=None, answer_scores=None) -> TaskOutput:
        """answer_scores: (B, num_answers) soft scores in [0, 1]; loss = BCE averaged, times num_answers (official)."""
        out = self.bert(input_ids, image_features, image_locations, token_type_ids, text_lens, image_lens)
        logits = self.vil_prediction(self._joint(out))  # (B, num_answers)
        loss = None
        if answer_scores is not None:
            _check_scores("answer_scores", answer_scores, tuple(logits.shape))
            loss = F.binary_cross_entropy_with_logits(logits.float(), answer_scores.float()) * logits.shape[1]
        return TaskOutput(**vars(out), logits=logits, loss=loss)


class ViLBERTForRetrieval(_TaskModel):
    """One matching score per (caption, image) pair: retrieval and multiple choice."""

    def __init__(self, config: ViLBERTConfig, backend: Optional[str] = None):
        super().__init__(config, backend)
        self.vil_logit = nn.Linear(self.config.bi_hidden_size, 1)
        self._init_head(self.vil_logit)

    def forward(self, input_ids, image_features, image_locations, token_type_ids=None, text_lens=None,
                image_lens=None, choice_labels=None) -> TaskOutput:
        """The batch holds groups of num_choices consecutive pairs; choice_labels (B / num_choices,) int64 is the index
        of the right pair in each group; loss = CE over each group's scores."""
        out = self.bert(input_ids, image_features, image_locations, token_type_ids, text_lens, image_lens)
        scores = self.pair_scores(out)  # (B,)
        loss = None
        if choice_labels is not None:
            _check_choice_labels(choice_labels, len(scores))
            loss = F.cross_entropy(scores.float().view(len(choice_labels), -1), choice_labels)  # (groups, num_choices)
        return TaskOutput(**vars(out), logits=scores, loss=loss)

    def pair_scores(self, out: ViLBERTOutput) -> torch.Tensor:
        """The pair-score head on an encoder output: (B,) matching scores."""
        return self.vil_logit(self._joint(out)).squeeze(-1)


class ViLBERTForReferring(_TaskModel):
    """One score per region (referring expressions); padded regions get -10000, as the official code."""

    def __init__(self, config: ViLBERTConfig, backend: Optional[str] = None):
        super().__init__(config, backend)
        self.vision_logit = nn.Linear(self.bert.image_hidden_size, 1)  # reads the last image layer
        self._init_head(self.vision_logit)

    def forward(self, input_ids, image_features, image_locations, token_type_ids=None, text_lens=None,
                image_lens=None, region_scores=None) -> TaskOutput:
        """region_scores: (B, V) targets in [0, 1] (e.g. IoU >= 0.5 with the referred box); loss = BCE summed over
        the real regions, averaged over the batch (the official scaling: the mean over all regions times V, where
        padded regions add nothing)."""
        out = self.bert(input_ids, image_features, image_locations, token_type_ids, text_lens, image_lens)
        logits = self.vision_logit(self.dropout(out.image_hidden)).squeeze(-1)  # (B, V)
        B, V = logits.shape
        real = torch.ones_like(logits, dtype=torch.bool)
        if image_lens is not None:
            real = torch.arange(V, device=logits.device)[None, :] < image_lens[:, None]  # (B, V)
            logits = logits.masked_fill(~real, -10000.0)
        loss = None
        if region_scores is not None:
            _check_scores("region_scores", region_scores, (B, V))
            bce = F.binary_cross_entropy_with_logits(logits.float(), region_scores.float(), reduction="none")
            loss = (bce * real).sum() / max(B, 1)
        return TaskOutput(**vars(out), logits=logits, loss=loss)


# ---- the single-stream baseline (the paper's ablation) -------------------------------------------------------------
class SingleStreamModel(CheckpointMixin, nn.Module):
    """One BERT over [text tokens ; region tokens]: the text stream's sizes and layers (config.hidden_size,
    num_hidden_layers, ...), regions embedded straight to hidden_size. Keys follow BERT (`encoder.layer.N`), so BERT
    initialisation loads the whole transformer. Returns the same ViLBERTOutput, so the pretraining heads are shared."""
    official_prefix = "bert."

    def __init__(self, config: ViLBERTConfig, backend: Optional[str] = None):
        super().__init__()
        self.config = config = _with_backend(config, backend)
        self.image_hidden_size = config.hidden_size
        self.embeddings = TextEmbeddings(config)
        self.v_embeddings = ImageEmbeddings(config, config.hidden_size)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(text_layer(config) for _ in range(config.num_hidden_layers))
        self.t_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.v_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids, image_features, image_locations, token_type_ids=None, text_lens=None,
                image_lens=None) -> ViLBERTOutput:
        _check_inputs(self.config, input_ids, image_features, image_locations, token_type_ids, text_lens, image_lens)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        text = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        image = self.v_embeddings(image_features, image_locations)  # (B, V, C)
        T = text.shape[1]
        x, order, lens = _pack(text, image, text_lens, image_lens)  # (B, T + V, C), real positions first
        for layer in self.encoder.layer:
            x = layer(x, lens)
        if order is not None:  # unpack: (B, T + V, C) back in input order
            x = x.gather(1, order.argsort(dim=1)[..., None].expand_as(x))
        text, image = x[:, :T], x[:, T:]
        return ViLBERTOutput(text, image, self.t_pooler(text), self.v_pooler(image))


def _pack(text, image, text_lens, image_lens):
    """Concatenate the two padded sequences so each sample's real tokens come first (lengths keep padding at the end).

    Returns the packed (B, T + V, C) tensor, `order` (B, T + V): packed position -> index into cat([text, image]),
    and the packed lengths (B,); order and lengths are None when no lengths are given (nothing to move)."""
    B, T = text.shape[:2]
    V = image.shape[1]
    seq = torch.cat([text, image], dim=1)  # (B, T + V, C)
    if text_lens is None and image_lens is None:
        return seq, None, None

    def lengths(lens, full):
        return torch.full((B,), full, device=seq.device) if lens is None else lens.to(seq.device, torch.long)

    text_lens, image_lens = lengths(text_lens, T), lengths(image_lens, V)
    pos = torch.arange(T + V, device=seq.device)[None, :]  # (1, T + V)
    is_text = pos < T
    real = torch.where(is_text, pos < text_lens[:, None], pos - T < image_lens[:, None])  # (B, T + V)
    # Sort key: real text token t -> t, real region j -> text_len + j, padding after all of them.
    key = torch.where(is_text, pos, text_lens[:, None] + pos - T)
    key = torch.where(real, key, T + V + pos)
    order = key.argsort(dim=1)  # (B, T + V)
    return seq.gather(1, order[..., None].expand_as(seq)), order, text_lens + image_lens


class SingleStreamForPretraining(ViLBERTForPretraining):
    """The single-stream ablation with ViLBERT's inputs, heads, losses and outputs, for a like-for-like comparison."""
    encoder_class = SingleStreamModel


# The downstream tasks on the single-stream encoder: the same heads, losses and outputs as the ViLBERT task models
# (the referring head reads the single stream's region positions, hidden_size wide).
class SingleStreamForVQA(ViLBERTForVQA):
    encoder_class = SingleStreamModel


class SingleStreamForRetrieval(ViLBERTForRetrieval):
    encoder_class = SingleStreamModel


class SingleStreamForReferring(ViLBERTForReferring):
    encoder_class = SingleStreamModel
