"""ViLBERT model: official size and structure, equality with the official implementation, every backend forward and
backward, triton == torch, padding invariance, losses, task heads, the single-stream baseline, input errors."""
import dataclasses
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vilbert import (SingleStreamForPretraining, ViLBERTConfig, ViLBERTForPretraining, ViLBERTForReferring,
                     ViLBERTForRetrieval, ViLBERTForVQA, ViLBERTModel, ops)
from vilbert import model as vilbert_model
from vilbert.model import region_kl_loss

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
ORACLE = SHARED / "official_oracle"
KEY_BIAS = re.compile(r"\.key[12]?\.bias$")
needs_shared = pytest.mark.skipif(not ORACLE.is_dir(), reason=f"official reference data not found at {SHARED}")


def triton_available() -> bool:
    try:
        ops.get("triton")
        return True
    except ImportError:
        return False


needs_triton = pytest.mark.skipif(not triton_available(),
                                  reason="vilbert_kernels does not export attention/co_attention/layer_norm/bias_gelu")
BACKENDS = ["torch", "sdpa", pytest.param("triton", marks=needs_triton)]


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(actual, expected) -> float:
    """Worst absolute difference relative to the reference's largest magnitude."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp(min=1e-30)).item()


def no_dropout(config: ViLBERTConfig) -> ViLBERTConfig:
    return dataclasses.replace(config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               v_hidden_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0)


def make_batch(config, text_lens, image_lens, T=None, V=None, generator=None):
    """A pretraining batch (the collator's keys); padded positions hold random junk, labels only at real positions."""
    g = generator or torch.Generator().manual_seed(0)
    text_lens, image_lens = torch.tensor(text_lens), torch.tensor(image_lens)
    B = len(text_lens)
    T = T or int(text_lens.max())
    V = V or int(image_lens.max())
    real_t = torch.arange(T)[None] < text_lens[:, None]
    real_v = torch.arange(V)[None] < image_lens[:, None]
    mlm_labels = torch.randint(0, config.vocab_size, (B, T), generator=g)
    mlm_labels[(torch.rand(B, T, generator=g) > 0.4) | ~real_t] = -100
    mlm_labels[:, 0] = -100  # [CLS] is never a target...
    mlm_labels[:, 1] = torch.randint(0, config.vocab_size, (B,), generator=g)  # ...but every sample has one
    region_mask = (torch.rand(B, V, generator=g) < 0.4) & real_v
    region_mask[:, 0] = False  # the IMG token is never masked
    return dict(
        input_ids=torch.randint(1, config.vocab_size, (B, T), generator=g),
        token_type_ids=torch.randint(0, config.type_vocab_size, (B, T), generator=g),
        text_lens=text_lens,
        image_features=torch.randn(B, V, config.v_feature_size, generator=g),
        image_locations=torch.rand(B, V, 5, generator=g),
        image_lens=image_lens,
        mlm_labels=mlm_labels,
        region_targets=torch.softmax(3 * torch.randn(B, V, config.v_target_size, generator=g), -1),
        region_mask=region_mask,
        is_aligned=torch.randint(0, 2, (B,), generator=g),
    )


def tiny(**overrides) -> ViLBERTConfig:
    return ViLBERTConfig.preset("tiny", **overrides)


# ---- size and structure ---------------------------------------------------------------------------------------------
def test_vilbert_base_parameter_count():
    with torch.device("meta"):
        model = ViLBERTForPretraining(ViLBERTConfig.preset("vilbert-base"))
    # Official: 250,044,029 unique parameters, of which 11,020,800 are the dead q_dense layers.
    assert sum(p.numel() for p in model.parameters()) == 250_044_029 - 11_020_800
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


@needs_shared
def test_vilbert_base_keys_map_one_to_one_onto_official():
    text = (SHARED / "official_vilbert_keys.txt").read_text().split("## VILBertForVLTasks")[0]
    official = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            official[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    with torch.device("meta"):
        model = ViLBERTForPretraining(ViLBERTConfig.preset("vilbert-base"))
    ours = {key: tuple(t.shape) for key, t in model.to_official_state_dict().items()}
    live = {key: shape for key, shape in official.items() if ".q_dense" not in key}
    assert len(official) - len(live) == 24  # q_dense1/2 weight and bias in 6 co-layers
    assert ours == live


# ---- equality with the official implementation ---------------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_official_oracle(backend):
    config = ViLBERTConfig.from_json(ORACLE / "config.json")
    inputs = torch.load(ORACLE / "inputs.pt")
    expected = torch.load(ORACLE / "outputs.pt")
    model = ViLBERTForPretraining(config, backend=backend).eval()
    model.load_official_state_dict(ORACLE / "pytorch_model.bin")
    names = ("input_ids", "token_type_ids", "image_features", "image_locations", "text_lens", "image_lens")
    with torch.no_grad():
        out = model(**{name: inputs[name] for name in names})  # no mlm_labels: MLM logits at every position
    for b, (t, v) in enumerate(zip(inputs["text_lens"].tolist(), inputs["image_lens"].tolist())):
        assert rel_err(out.text_hidden[b, :t], expected["text_hidden"][b, :t]) < 1e-4
        assert rel_err(out.image_hidden[b, :v], expected["image_hidden"][b, :v]) < 1e-4
        assert rel_err(out.mlm_logits[b, :t], expected["mlm_logits_all_positions"][b, :t]) < 1e-4
        assert rel_err(out.region_logits[b, :v], expected["region_logits"][b, :v]) < 1e-4
    for name in ("pooled_text", "pooled_image", "align_logits"):
        assert rel_err(getattr(out, name), expected[name]) < 1e-4, name


# ---- every backend --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward(backend):
    torch.manual_seed(0)
    config = tiny()
    model = ViLBERTForPretraining(config, backend=backend).train()
    batch = make_batch(config, [5, 3], [4, 2])
    out = model(**batch)
    n_targets = int((batch["mlm_labels"] != -100).sum())
    assert out.mlm_logits.shape == (n_targets, config.vocab_size)
    assert out.region_logits.shape == (int(batch["region_mask"].sum()), config.v_target_size)
    assert out.align_logits.shape == (2, 2)
    assert out.text_hidden.shape == (2, 5, config.hidden_size)
    assert out.image_hidden.shape == (2, 4, config.v_hidden_size)
    assert out.pooled_text.shape == out.pooled_image.shape == (2, config.bi_hidden_size)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.mlm_loss + out.region_loss + out.align_loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not KEY_BIAS.search(name):  # softmax ignores a constant per query, so key biases get no gradient
            assert p.grad.abs().sum() > 0, name  # every other parameter takes part (no dead ones)


def _outputs_and_grads(backend, config, state, batch):
    model = ViLBERTForPretraining(config, backend=backend).train()  # dropout 0 in config: deterministic
    model.load_state_dict(state)
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out, grads


@pytest.mark.parametrize("backend", ["sdpa", pytest.param("triton", marks=needs_triton)])
def test_backend_equals_torch_fp32(backend):
    torch.manual_seed(1)
    config = no_dropout(tiny())
    state = ViLBERTForPretraining(config).state_dict()
    batch = make_batch(config, [5, 2, 4], [3, 4, 1])
    ref_out, ref_grads = _outputs_and_grads("torch", config, state, batch)
    out, grads = _outputs_and_grads(backend, config, state, batch)
    real_t = torch.arange(5)[None] < batch["text_lens"][:, None]
    real_v = torch.arange(4)[None] < batch["image_lens"][:, None]
    assert rel_err(out.text_hidden[real_t], ref_out.text_hidden[real_t]) < 1e-5
    assert rel_err(out.image_hidden[real_v], ref_out.image_hidden[real_v]) < 1e-5
    for name in ("pooled_text", "pooled_image", "mlm_logits", "align_logits", "loss", "mlm_loss", "region_loss",
                 "align_loss"):
        assert rel_err(getattr(out, name), getattr(ref_out, name)) < 1e-5, name
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name, grad in ref_grads.items():  # floor: key-bias gradients are rounding noise around 0
        assert (grads[name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-7 * scale, name


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("backend", ["sdpa", pytest.param("triton", marks=needs_triton)])
def test_low_precision_backend_as_accurate_as_torch(backend, dtype, device):
    """In fp16 / bf16 (bf16 on a GPU only: Triton's interpreter cannot multiply bf16, triton-lang/triton#11584), a
    backend's outputs and gradients are as close to the fp32 model as the torch backend's own in that dtype: within 3x
    that error, plus a floor (larger for gradients: a LayerNorm parameter's is a sum over every position, whose bf16
    error varies 2-5x between two correct attention implementations, sdpa and torch, on the CPU). The `small` model
    with ViLBERT's head dims (64 in the streams, 128 in the co-attention) and pretraining lengths."""
    torch.manual_seed(2)
    config = no_dropout(ViLBERTConfig.preset("small", bi_hidden_size=256))  # 2 co-attention heads of 128
    state = ViLBERTForPretraining(config).state_dict()
    batch = make_batch(config, [36, 20, 9, 30, 2, 36], [37, 12, 25, 1, 37, 30], T=36, V=37)
    real_t = (torch.arange(36)[None] < batch["text_lens"][:, None]).to(device)
    real_v = (torch.arange(37)[None] < batch["image_lens"][:, None]).to(device)

    def run(name, dtype):
        """Outputs at real positions, and the parameters' gradients, as fp32."""
        model = ViLBERTForPretraining(config, backend=name)
        model.load_state_dict(state)
        model = model.to(device, dtype).train()  # dropout 0 in config: deterministic
        out = model(**{k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()})
        out.loss.backward()
        outputs = {"text_hidden": out.text_hidden[real_t], "image_hidden": out.image_hidden[real_v],
                   **{k: getattr(out, k) for k in ("mlm_logits", "region_logits", "align_logits", "loss")}}
        grads = {n: p.grad for n, p in model.named_parameters() if not KEY_BIAS.search(n)}  # those are noise near 0
        return {k: v.float() for k, v in outputs.items()}, {k: v.float() for k, v in grads.items()}

    truth, torch_low, got = run("torch", torch.float32), run("torch", dtype), run(backend, dtype)
    for part, floor in ((0, 1e-3), (1, 2e-2)):  # outputs, gradients
        for key, expected in truth[part].items():
            err, base = ((x[part][key] - expected).abs().max().item() for x in (got, torch_low))
            assert err <= 3 * base + floor * expected.abs().max().item(), (key, err, base)


@pytest.mark.parametrize("backend, model_class", [
    ("torch", ViLBERTForPretraining), ("sdpa", ViLBERTForPretraining),
    pytest.param("triton", ViLBERTForPretraining, marks=needs_triton),
    ("torch", SingleStreamForPretraining), ("sdpa", SingleStreamForPretraining)])
def test_padding_changes_nothing(backend, model_class):
    """Each sample run alone and unpadded == the same sample in a padded batch (more padding, junk in it)."""
    torch.manual_seed(2)
    config = tiny()
    model = model_class(config, backend=backend).eval()
    text_lens, image_lens = [3, 6, 1], [5, 2, 3]
    batch = make_batch(config, text_lens, image_lens, T=8, V=7)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "mlm_labels"})
        for b, (t, v) in enumerate(zip(text_lens, image_lens)):
            alone = {k: batch[k][b:b + 1, :t] for k in ("input_ids", "token_type_ids")}
            alone.update({k: batch[k][b:b + 1, :v] for k in ("image_features", "image_locations", "region_targets",
                                                             "region_mask")})
            one = model(**alone, is_aligned=batch["is_aligned"][b:b + 1])
            assert rel_err(out.text_hidden[b, :t], one.text_hidden[0]) < 1e-5
            assert rel_err(out.image_hidden[b, :v], one.image_hidden[0]) < 1e-5
            assert rel_err(out.mlm_logits[b, :t], one.mlm_logits[0]) < 1e-5
            for name in ("pooled_text", "pooled_image", "align_logits"):
                assert rel_err(getattr(out, name)[b], getattr(one, name)[0]) < 1e-5, name


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_bf16_weights_take_float32_data(backend):
    """DeepSpeed bf16 casts the weights, not the batch: the model takes the float32 features in its own dtype."""
    torch.manual_seed(6)
    config = no_dropout(tiny())
    model = ViLBERTForPretraining(config, backend=backend)
    batch = make_batch(config, [5, 3], [4, 2])
    expected = model(**batch).loss
    out = model.to(torch.bfloat16)(**batch)
    assert out.text_hidden.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert abs(out.loss.item() - expected.item()) < 0.05 * expected.item()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---- losses ---------------------------------------------------------------------------------------------------------
def test_losses_against_float64_formulas():
    torch.manual_seed(3)
    config = tiny()
    model = ViLBERTForPretraining(config).eval()
    batch = make_batch(config, [4, 6], [5, 3])
    with torch.no_grad():
        out = model(**batch)
        full = model(**{k: v for k, v in batch.items() if k not in ("mlm_labels", "region_targets", "region_mask")})
    targets = batch["mlm_labels"] != -100
    # The heads run on the targets only: their rows are the same rows of the heads over every position.
    torch.testing.assert_close(out.mlm_logits, full.mlm_logits[targets])
    assert full.region_logits.shape == (2, 5, config.v_target_size) and batch["region_mask"].sum() >= 2
    torch.testing.assert_close(out.region_logits, full.region_logits[batch["region_mask"]])
    mlm = F.cross_entropy(full.mlm_logits.double().flatten(0, 1), batch["mlm_labels"].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.mlm_loss.double(), mlm)
    kl = F.kl_div(F.log_softmax(full.region_logits.double(), -1), batch["region_targets"].double(),
                  reduction="none").sum(-1)
    mask = batch["region_mask"]
    torch.testing.assert_close(out.region_loss.double(), kl[mask].mean())
    # The official labels: 0 for the image's own caption, 1 for a swapped one (is_aligned says the reverse).
    align = F.cross_entropy(full.align_logits.double(), 1 - batch["is_aligned"])
    torch.testing.assert_close(out.align_loss.double(), align)
    # PretrainCollator's layout: only the masked regions' rows, in region_mask's row-major order.
    with torch.no_grad():
        compact = model(**{**batch, "region_targets": batch["region_targets"][mask]})
    assert torch.equal(compact.region_loss, out.region_loss)
    with pytest.raises(ValueError, match="region_targets has 1 rows but region_mask selects"):
        model(**{**batch, "region_targets": batch["region_targets"][mask][:1]})


def test_losses_without_targets_are_zero_not_nan():
    config = tiny()
    model = ViLBERTForPretraining(config).eval()
    batch = make_batch(config, [4, 3], [3, 3])
    batch["mlm_labels"][:] = -100
    batch["region_mask"][:] = False
    out = model(**batch)
    assert out.mlm_logits.shape == (0, config.vocab_size)
    assert out.mlm_loss.item() == 0.0 and out.region_loss.item() == 0.0
    assert out.mlm_acc is None  # no accuracy without targets (a mean over none would be NaN)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_region_kl_loss():
    logits = torch.randn(3, 5)
    targets = torch.softmax(torch.randn(3, 5), -1)
    targets[1] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])  # zeros in the target: 0 log 0 = 0
    expected = sum(F.kl_div(F.log_softmax(logits[j], -1), targets[j], reduction="sum") for j in range(3)) / 3
    torch.testing.assert_close(region_kl_loss(logits, targets), expected)
    assert region_kl_loss(logits[:0], targets[:0]).item() == 0.0  # no masked region: zero, not NaN


def test_outputs_without_labels():
    config = tiny()
    batch = make_batch(config, [4, 3], [3, 2])
    out = ViLBERTForPretraining(config)(batch["input_ids"], batch["image_features"], batch["image_locations"])
    assert out.loss is None and out.mlm_loss is None and out.region_loss is None and out.align_loss is None
    assert out.mlm_logits.shape == (2, 4, config.vocab_size)
    base = ViLBERTModel(config)(batch["input_ids"], batch["image_features"], batch["image_locations"])
    assert base.pooled_text.shape == (2, config.bi_hidden_size)


@pytest.mark.parametrize("model_class", [ViLBERTForPretraining, ViLBERTForVQA, SingleStreamForPretraining])
def test_initialisation_is_the_official_one(model_class):
    """N(0, initializer_range) for every Linear and Embedding weight, zero biases, LayerNorm weight 1 and bias 0."""
    torch.manual_seed(5)
    std = 0.05  # not the default 0.02: the model must read it from the config
    model = model_class(tiny(initializer_range=std))
    weights, biases, norms = [], [], 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            weights.append(module.weight.detach().flatten())
            if getattr(module, "bias", None) is not None:
                biases.append(module.bias.detach())
        if isinstance(module, (vilbert_model.LayerNorm, torch.nn.LayerNorm)):
            norms += 1
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    weights = torch.cat(weights).double()
    assert norms > 0 and len(weights) > 100_000
    # ~150k draws: the sample std and mean sit within 0.3% of std of their expectations (1 sigma)
    assert abs(weights.std().item() - std) < 0.02 * std and abs(weights.mean().item()) < 0.02 * std
    assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)
    if hasattr(model, "cls"):
        assert torch.equal(model.cls.predictions.bias, torch.zeros_like(model.cls.predictions.bias))


def test_backend_switch_and_constructor_argument():
    config = tiny()
    model = ViLBERTForPretraining(config, backend="sdpa")
    assert config.backend == "torch" and model.config.backend == "sdpa"  # the caller's config is not changed
    assert model.bert.config is model.config  # one config object: switching it switches every module
    with pytest.raises(ValueError, match="backend"):
        ViLBERTForPretraining(config, backend="cuda")
    with pytest.raises(TypeError, match="config must be a ViLBERTConfig, got str"):
        ViLBERTModel("tiny")


# ---- task heads and the single-stream baseline ----------------------------------------------------------------------
def test_task_heads_forward_backward():
    torch.manual_seed(4)
    config = tiny()
    batch = make_batch(config, [4, 3, 4, 2], [3, 3, 2, 3])
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "text_lens", "image_features", "image_locations",
                                    "image_lens")}
    vqa = ViLBERTForVQA(config)
    answer_scores = torch.rand(4, config.num_answers)
    out = vqa(**inputs, answer_scores=answer_scores)
    assert out.logits.shape == (4, config.num_answers)
    # The official scaling: BCE's mean over every (pair, answer) times the number of answers.
    official = F.binary_cross_entropy_with_logits(out.logits.double(), answer_scores.double()) * config.num_answers
    torch.testing.assert_close(out.loss.double(), official)
    out.loss.backward()

    retrieval = ViLBERTForRetrieval(config)
    out = retrieval(**inputs, choice_labels=torch.tensor([0, 1]))  # two groups of two choices
    assert out.logits.shape == (4,)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.view(2, 2), torch.tensor([0, 1])))
    for labels in (torch.tensor([0, 1, 0]), torch.zeros(4, dtype=torch.long),  # 4 groups of 1: the loss would be 0
                   torch.tensor([0, 1], dtype=torch.int32), [0, 1], torch.tensor([0, 2]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match="choice_labels"):
            retrieval(**inputs, choice_labels=labels)
    with pytest.raises(ValueError, match="answer_scores"):
        vqa(**inputs, answer_scores=[[0.0] * config.num_answers] * 4)

    referring = ViLBERTForReferring(config)
    real = torch.arange(3)[None] < batch["image_lens"][:, None]
    region_scores = (torch.rand(4, 3) > 0.5).float() * real
    out = referring(**inputs, region_scores=region_scores)
    assert out.logits.shape == (4, 3)
    assert (out.logits[~real] == -10000.0).all()
    # The official scaling: BCE's mean over every region times the regions per sample (padding adds ~0).
    official = F.binary_cross_entropy_with_logits(out.logits.double(), region_scores.double()) * 3
    torch.testing.assert_close(out.loss.double(), official)
    out.loss.backward()
    # Targets at padded regions are not the data's: they change nothing.
    with torch.no_grad():
        clean, junk = (referring.eval()(**inputs, region_scores=scores).loss
                       for scores in (region_scores, torch.where(real, region_scores, torch.ones_like(region_scores))))
    assert torch.equal(junk, clean)
    with pytest.raises(ValueError, match="region_scores"):
        referring(**inputs, region_scores=region_scores.tolist())


def test_single_stream_forward_backward():
    torch.manual_seed(5)
    config = tiny()
    model = SingleStreamForPretraining(config)
    assert not any(".v_layer." in name or ".c_layer." in name for name, _ in model.named_parameters())
    out = model(**make_batch(config, [5, 3], [4, 2]))
    assert out.image_hidden.shape == (2, 4, config.hidden_size)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, value, message", [
    ("input_ids", torch.zeros(2, 4), "input_ids"),
    ("image_features", torch.zeros(2, 3, 100), "image_features"),
    ("image_features", torch.zeros(3, 3, 2048), "image_features"),
    ("image_locations", torch.zeros(2, 3, 4), "image_locations"),
    ("token_type_ids", torch.zeros(2, 5, dtype=torch.long), "token_type_ids"),
    ("text_lens", torch.tensor([4, 4, 4]), "text_lens"),
    ("image_lens", torch.tensor([3.0, 3.0]), "image_lens"),
    ("mlm_labels", torch.zeros(2, 3, dtype=torch.long), "mlm_labels"),
    ("region_targets", torch.zeros(2, 3, 7), "region_targets"),
    ("region_targets", torch.zeros(2, 7), "region_targets"),
    ("is_aligned", torch.zeros(2), "is_aligned"),
    # values: the official ignore index, a token id beyond the vocabulary, a label that is neither 0 nor 1
    ("mlm_labels", torch.full((2, 4), -1), "official data marks non-targets -1"),
    ("mlm_labels", torch.full((2, 4), 128), r"token ids in \[0, 128\)"),
    ("is_aligned", torch.tensor([1, 2]), "expected 0 or 1"),
    ("is_aligned", torch.tensor([-1, 1]), "expected 0 or 1"),
])
def test_bad_inputs_name_the_argument(name, value, message):
    config = tiny()
    batch = make_batch(config, [4, 4], [3, 3])
    batch[name] = value
    with pytest.raises(ValueError, match=message):
        ViLBERTForPretraining(config)(**batch)


def test_too_long_text_and_half_given_region_labels():
    config = tiny(max_position_embeddings=8)
    model = ViLBERTForPretraining(config)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(**make_batch(config, [9], [3]))
    batch = make_batch(config, [4], [3])
    del batch["region_mask"]
    with pytest.raises(ValueError, match="region_mask"):
        model(**batch)


def test_co_attention_drops_each_direction_at_its_official_rate(monkeypatch):
    """Text queries over image keys at v_attention_probs_dropout_prob, image queries over text keys at
    attention_probs_dropout_prob (the official dropout1 / dropout2); one co_attention call when the two agree."""
    from vilbert_kernels import reference
    calls = []

    def recording(name):
        def op(*args):
            calls.append((name, args[0].shape[1], args[-1]))  # (op, query length, dropout_p)
            return getattr(reference, name)(*args)
        return op

    monkeypatch.setattr(ops, "get", lambda backend: types.SimpleNamespace(
        attention=recording("attention"), co_attention=recording("co_attention"), layer_norm=reference.layer_norm,
        bias_gelu=reference.bias_gelu))
    T, V = 4, 5
    for text_p, image_p, expected in ((0.3, 0.1, [("attention", T, 0.3), ("attention", V, 0.1)]),
                                      (0.2, 0.2, [("co_attention", T, 0.2)])):
        config = dataclasses.replace(ViLBERTConfig.preset("tiny"), v_attention_probs_dropout_prob=text_p,
                                     attention_probs_dropout_prob=image_p)
        layer = ViLBERTModel(config).encoder.c_layer[0].biattention.train()
        calls.clear()
        layer(torch.randn(2, V, config.v_hidden_size), None, torch.randn(2, T, config.hidden_size), None)
        assert calls == expected


@pytest.mark.parametrize("model_class, head, classifier", [
    (ViLBERTForPretraining, "alignment_logits", lambda model: model.cls.bi_seq_relationship),
    (ViLBERTForRetrieval, "pair_scores", lambda model: lambda x: model.vil_logit(x).squeeze(-1)),
], ids=["alignment", "retrieval"])
@pytest.mark.parametrize("pooling, fuse", [("mul", torch.mul), ("sum", torch.add)])
def test_heads_drop_the_joint_vector_in_training_only(model_class, head, classifier, pooling, fuse):
    """As the official heads: dropout (hidden_dropout_prob) on the joint vector before the classifier, the joint vector
    pooled_text * pooled_image (the paper) or, with pooling_method "sum", pooled_text + pooled_image."""
    config = tiny(hidden_dropout_prob=0.5, pooling_method=pooling)
    model = model_class(config)
    out = types.SimpleNamespace(pooled_text=torch.randn(64, config.bi_hidden_size),
                                pooled_image=torch.randn(64, config.bi_hidden_size))
    head = getattr(model, head)
    torch.manual_seed(0)
    assert not torch.equal(head(out), head(out)), "training: two calls should draw two dropout masks"
    model.eval()
    torch.testing.assert_close(head(out), classifier(model)(fuse(out.pooled_text, out.pooled_image)), rtol=0, atol=0)


def test_vqa_head_is_the_official_simple_classifier():
    """vil_prediction: Linear(bi, 2 bi), exact (erf) GELU, LayerNorm, Linear(2 bi, num_answers)."""
    config = tiny()
    head = ViLBERTForVQA(config).vil_prediction
    first, _, norm, last = head.logit_fc
    x = torch.randn(5, config.bi_hidden_size)
    hidden = F.layer_norm(F.gelu(first(x)), (2 * config.bi_hidden_size,), norm.weight, norm.bias, 1e-12)
    torch.testing.assert_close(head(x), last(hidden))


def test_alignment_log_odds_are_those_of_the_heads_probability():
    """log(p / (1 - p)) with p the softmax probability that the caption belongs to the image (zero-shot retrieval's
    score)."""
    logits = torch.randn(6, 2, dtype=torch.float64)
    p = logits.softmax(-1)[:, vilbert_model.ALIGNED]
    torch.testing.assert_close(vilbert_model.alignment_log_odds(logits), torch.log(p / (1 - p)))
