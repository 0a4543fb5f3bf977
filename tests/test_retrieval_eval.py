"""All-pairs retrieval scoring (vilbert/tasks/retrieval.py `score_all_pairs`, `PairScorer`) and the staged forward it
uses (ViLBERTModel.encode_text / encode_image / fuse_streams): every score equals the whole model run on that one
pair alone, unpadded, while each caption's text-only layers run once, not once per chunk of images."""
import numpy as np
import pytest
import torch

from vilbert import (SingleStreamForPretraining, SingleStreamForRetrieval, ViLBERTConfig, ViLBERTForPretraining,
                     ViLBERTForRetrieval)
from vilbert.data import load_tokenizer
from vilbert.data.stores import StoreWriter, open_store
from vilbert.tasks.common import TaskCollator, encode_regions, encode_text, model_inputs
from vilbert.tasks.models import alignment_score, retrieval_score
from vilbert.tasks.retrieval import score_all_pairs

NUM_REGIONS = (1, 4, 2, 7, 3)  # per image: different region counts, so image chunks are padded
IMAGE_IDS = list(range(len(NUM_REGIONS)))
CAPTIONS = ["a", "a red square left of a blue circle", "two dogs", "the big green thing near the small yellow one"]
MAX_TEXT_LEN, MAX_REGIONS, IMAGE_CHUNK = 12, 10, 2  # 5 images in chunks of 2, 2, 1
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("store") / "features"
    with StoreWriter(path) as writer:
        for image_id, n in zip(IMAGE_IDS, NUM_REGIONS):
            corners = rng.uniform(0, 50, (n, 2)).astype(np.float32)
            boxes = np.concatenate([corners, corners + rng.uniform(5, 50, (n, 2)).astype(np.float32)], axis=1)
            writer.add({"image_id": str(image_id), "image_w": 100, "image_h": 100, "boxes": boxes,
                        "features": rng.uniform(0, 2, (n, 2048)).astype(np.float32)})
    return open_store(path)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tiny(**overrides) -> ViLBERTConfig:
    """The tiny preset (its first co-layer comes after 1 text layer and 0 visual layers), with weights 10x the usual
    init so that scores differ visibly across pairs."""
    return ViLBERTConfig.preset("tiny", vocab_size=load_tokenizer().vocab_size, backend="torch",
                                initializer_range=0.2, **overrides)


# v_biattention_id [1, 2]: one visual layer before the first co-layer, so the image prefix has a layer too.
CONFIGS = {"tiny": {}, "image_prefix_layer": {"v_biattention_id": [1, 2]}}


def scores_pair_by_pair(model_score, store, tokenizer):
    """(I, C) scores of the whole model run on each (image, caption) pair alone: a batch of one, no padding."""
    scores = torch.empty(len(IMAGE_IDS), len(CAPTIONS))
    for i in IMAGE_IDS:
        for c, caption in enumerate(CAPTIONS):
            sample = {**encode_text(tokenizer, caption, MAX_TEXT_LEN), **encode_regions(store[i], MAX_REGIONS)}
            with torch.no_grad():
                scores[i, c] = model_score(model_inputs(TaskCollator()([sample]))).item()
    return scores


def align_log_odds(model):
    """The whole pretraining model's alignment log-odds, as alignment_score gives them."""
    def score(batch):
        logits = model(**batch).align_logits
        return logits[:, 0] - logits[:, 1]  # class 0: the caption belongs to the image (the official head's)
    return score


def assert_close(actual, expected):
    worst = (actual - expected).abs().max().item()
    assert worst < TOL, f"worst |staged - whole| = {worst:.3g}"
    assert expected.std() > 100 * TOL  # the scores differ across pairs: a broadcast or chunking slip would show


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_retrieval_head_scores_equal_whole_model_per_pair(store, tokenizer, overrides):
    torch.manual_seed(0)
    model = ViLBERTForRetrieval(tiny(**overrides)).eval()
    score_fn = retrieval_score(model)
    assert score_fn.shares_prefixes
    scores = score_all_pairs(score_fn, store, tokenizer, IMAGE_IDS, CAPTIONS, image_chunk=IMAGE_CHUNK,
                             max_text_len=MAX_TEXT_LEN, max_regions=MAX_REGIONS)
    assert_close(scores, scores_pair_by_pair(lambda batch: model(**batch).logits, store, tokenizer))


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_alignment_head_scores_equal_whole_model_per_pair(store, tokenizer, overrides):
    torch.manual_seed(1)
    model = ViLBERTForPretraining(tiny(**overrides)).eval()
    score_fn = alignment_score(model)
    assert score_fn.shares_prefixes
    scores = score_all_pairs(score_fn, store, tokenizer, IMAGE_IDS, CAPTIONS, image_chunk=IMAGE_CHUNK,
                             max_text_len=MAX_TEXT_LEN, max_regions=MAX_REGIONS)
    assert_close(scores, scores_pair_by_pair(align_log_odds(model), store, tokenizer))


def test_each_stream_prefix_runs_once(store, tokenizer):
    """Text-only layers: one call per caption (batch of one); image-only layers: one call per chunk, each image once.
    The layers after the first co-layer run per (caption, chunk)."""
    torch.manual_seed(2)
    model = ViLBERTForRetrieval(tiny(**CONFIGS["image_prefix_layer"])).eval()
    encoder = model.bert.encoder
    assert (encoder.num_text_prefix_layers, encoder.num_image_prefix_layers) == (1, 1)
    calls = {"text_prefix": [], "image_prefix": [], "after_co_layer": []}
    for name, layer in (("text_prefix", encoder.layer[0]), ("image_prefix", encoder.v_layer[0]),
                        ("after_co_layer", encoder.layer[1])):
        layer.register_forward_hook(lambda module, args, out, name=name: calls[name].append(args[0].shape[0]))
    score_all_pairs(retrieval_score(model), store, tokenizer, IMAGE_IDS, CAPTIONS, image_chunk=IMAGE_CHUNK,
                    max_text_len=MAX_TEXT_LEN, max_regions=MAX_REGIONS)
    num_chunks = -(-len(IMAGE_IDS) // IMAGE_CHUNK)
    assert calls["text_prefix"] == [1] * len(CAPTIONS)
    assert calls["image_prefix"] == [2, 2, 1]
    assert len(calls["after_co_layer"]) == len(CAPTIONS) * num_chunks


@pytest.mark.parametrize("model_class, score_fn, whole_score", [
    (SingleStreamForPretraining, alignment_score, align_log_odds),
    (SingleStreamForRetrieval, retrieval_score, lambda model: lambda batch: model(**batch).logits),
], ids=["alignment", "retrieval"])
def test_single_stream_model_falls_back_to_whole_pairs(store, tokenizer, model_class, score_fn, whole_score):
    """The single-stream model has no text-only layers: every (caption, chunk) runs the whole model."""
    torch.manual_seed(3)
    model = model_class(tiny()).eval()
    score_fn = score_fn(model)
    assert not score_fn.shares_prefixes
    embedded = []
    model.bert.embeddings.register_forward_hook(lambda module, args, out: embedded.append(out.shape[0]))
    scores = score_all_pairs(score_fn, store, tokenizer, IMAGE_IDS, CAPTIONS, image_chunk=IMAGE_CHUNK,
                             max_text_len=MAX_TEXT_LEN, max_regions=MAX_REGIONS)
    assert embedded == [2, 2, 1] * len(CAPTIONS)
    assert_close(scores, scores_pair_by_pair(whole_score(model), store, tokenizer))


def test_scores_do_not_depend_on_chunking_or_image_order(store, tokenizer):
    """Chunks of 1 (no region padding), 3, and all images in one (padded to the most regions); images reversed."""
    torch.manual_seed(4)
    model = ViLBERTForRetrieval(tiny(**CONFIGS["image_prefix_layer"])).eval()
    score_fn = retrieval_score(model)

    def scores(image_ids, image_chunk):
        return score_all_pairs(score_fn, store, tokenizer, image_ids, CAPTIONS, image_chunk=image_chunk,
                               max_text_len=MAX_TEXT_LEN, max_regions=MAX_REGIONS)
    unpadded = scores(IMAGE_IDS, 1)
    for image_chunk in (3, len(IMAGE_IDS)):
        assert_close(scores(IMAGE_IDS, image_chunk), unpadded)
    assert_close(scores(IMAGE_IDS[::-1], 2).flip(0), unpadded)


def test_triton_backend_scores_match_torch(store, tokenizer):
    """The caption's lengths reach the Triton kernels broadcast over a chunk of images (a stride-0 view): they must
    still read each sample's length (in the CPU tests the kernels run in Triton's interpreter)."""
    torch.manual_seed(7)
    model = ViLBERTForRetrieval(tiny()).eval()
    image_ids, captions = IMAGE_IDS[:3], CAPTIONS[:2]

    def scores():
        return score_all_pairs(retrieval_score(model), store, tokenizer, image_ids, captions, image_chunk=3,
                               max_text_len=MAX_TEXT_LEN, max_regions=MAX_REGIONS)
    expected = scores()
    model.config.backend = "triton"  # one config object per model: switches every layer
    assert_close(scores(), expected)


def test_staged_forward_with_padded_and_broadcast_text():
    """fuse_streams(encode_text, encode_image) on a padded batch of captions equals each caption alone, and a caption
    broadcast over images as a view (expand) equals a materialized copy."""
    torch.manual_seed(5)
    config = tiny(**CONFIGS["image_prefix_layer"])
    model = ViLBERTForRetrieval(config).eval().bert
    text_lens, image_lens = torch.tensor([3, 7, 1]), torch.tensor([4, 2, 6])
    input_ids = torch.randint(1, config.vocab_size, (3, 7))
    image_features, image_locations = torch.randn(3, 6, config.v_feature_size), torch.rand(3, 6, 5)
    with torch.no_grad():
        text = model.encode_text(input_ids, None, text_lens)  # (3, 7, hidden_size)
        image = model.encode_image(image_features, image_locations, image_lens)  # (3, 6, v_hidden_size)
        batched = model.fuse_streams(text, image, text_lens, image_lens)
        for b, (t, v) in enumerate(zip(text_lens.tolist(), image_lens.tolist())):
            alone = model(input_ids[b:b + 1, :t], image_features[b:b + 1, :v], image_locations[b:b + 1, :v])
            for name in ("pooled_text", "pooled_image"):
                assert torch.allclose(getattr(batched, name)[b], getattr(alone, name)[0], atol=TOL), name
            assert torch.allclose(batched.text_hidden[b, :t], alone.text_hidden[0], atol=TOL)
            assert torch.allclose(batched.image_hidden[b, :v], alone.image_hidden[0], atol=TOL)

        caption = text[1:2].expand(3, -1, -1)  # (3, 7, hidden_size), stride 0 over the batch
        lens = text_lens[1:2].repeat(3)
        viewed = model.fuse_streams(caption, image, lens, image_lens)
        copied = model.fuse_streams(caption.contiguous(), image, lens, image_lens)
    assert torch.equal(viewed.pooled_text, copied.pooled_text)
    assert torch.equal(viewed.pooled_image, copied.pooled_image)


def test_stages_without_co_layers_are_the_whole_streams():
    """No co-layer: each prefix is its whole stream and fuse_streams only pools."""
    torch.manual_seed(6)
    config = tiny(v_biattention_id=[], t_biattention_id=[])
    model = ViLBERTForRetrieval(config).eval().bert
    assert (model.encoder.num_text_prefix_layers, model.encoder.num_image_prefix_layers) == (3, 2)
    input_ids, image_features = torch.randint(1, config.vocab_size, (2, 5)), torch.randn(2, 4, config.v_feature_size)
    image_locations = torch.rand(2, 4, 5)
    with torch.no_grad():
        out = model(input_ids, image_features, image_locations)
        assert torch.equal(out.text_hidden, model.encode_text(input_ids))
        assert torch.equal(out.image_hidden, model.encode_image(image_features, image_locations))


def test_fuse_streams_rejects_mismatched_streams():
    config = tiny()
    model = ViLBERTForRetrieval(config).bert
    text, image = torch.zeros(2, 5, config.hidden_size), torch.zeros(2, 4, config.v_hidden_size)
    with pytest.raises(ValueError, match="image: expected"):
        model.fuse_streams(text, image[:1])
    with pytest.raises(ValueError, match="text: expected"):
        model.fuse_streams(torch.zeros(2, 5, 7), image)
    with pytest.raises(ValueError, match="text_lens"):
        model.fuse_streams(text, image, torch.tensor([5]))
    with pytest.raises(ValueError, match="image_features"):
        model.encode_image(torch.zeros(2, 4, 7), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="input_ids"):
        model.encode_text(torch.zeros(2, 5))
