"""Tokenizer, synthetic data, pretraining samples (masking statistics and invariants) and the collator."""
import multiprocessing
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vilbert.data import (IGNORE_INDEX, BadRecordError, PretrainCollator, PretrainDataset, ResumableSampler,
                          StoreWriter, ensure_default_data, image_locations, load_tokenizer, open_store,
                          write_synthetic)
from vilbert.data import pretrain as pretrain_module
from vilbert.data.synthetic import (CLASS_INDEX, MAX_NAMED, OBJECT_NAMES, RELATIONS, class_embeddings, generate,
                                    make_image, noun_phrase, vocabulary_words)

NUM_IMAGES = 120


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic(path, NUM_IMAGES, seed=7)
    return open_store(path)


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_specials_encode_decode(tokenizer, tmp_path):
    specials = (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id)
    assert specials == (0, 1, 2, 3, 4)
    ids = tokenizer.encode("A Red CUBE to the left of a dog.", max_len=36)
    assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id and tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == "a red cube to the left of a dog."
    assert tokenizer.encode("a red cube and a cat", max_len=4) == [tokenizer.cls_id, *ids[1:3], tokenizer.sep_id]
    assert tokenizer.tokenize("zebra") == ["z", "##e", "##b", "##r", "##a"]  # unseen word -> pieces, not [UNK]
    assert all(tokenizer.tokenize(word) == [word] for word in vocabulary_words())  # the shipped vocab is complete
    with pytest.raises(ValueError, match="max_len"):
        tokenizer.encode("a dog", max_len=1)
    # A BERT-style vocab: specials at BERT's ids and [unused] placeholders, which are never random replacements.
    vocab = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    bert = load_tokenizer(tmp_path / "vocab.txt")
    assert (bert.vocab_size, bert.unk_id, bert.cls_id, bert.mask_id) == (10, 3, 4, 6)
    assert bert.word_ids.tolist() == [7, 8, 9]
    assert bert.encode("A DOGS", 10) == [4, 7, 8, 9, 5]
    (tmp_path / "bad.txt").write_text("a\ndog\n")
    with pytest.raises(ValueError, match="lacks the special tokens"):
        load_tokenizer(tmp_path / "bad.txt")


# ---------------------------------------------------------------------------------------------------- synthetic data


RELATION_PATTERN = re.compile(f"^(?P<a>.+) (?P<relation>{'|'.join(RELATIONS)}) (?P<b>.+)$")


def parse_caption(caption):
    """(named object numbers in caption order, relation or None) of a synthetic caption: noun phrases joined by " , "
    and a last " and ", the first one possibly "<a> <relation> <b>"."""
    phrases = {noun_phrase(name): k for k, name in enumerate(OBJECT_NAMES)}
    head, _, last = caption.rpartition(" and ")
    parts = [*head.split(" , "), last] if head else [last]
    relation = RELATION_PATTERN.match(parts[0])
    if relation:
        parts[:1] = [relation["a"], relation["b"]]
    assert all(part in phrases for part in parts), f"caption {caption!r} is not a list of noun phrases"
    return [phrases[part] for part in parts], relation and relation["relation"]


def box_relation_holds(relation, a, b):
    """Whether box a ([x1, y1, x2, y2], y growing downwards) lies entirely to the left of / ... box b."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a, b
    return {"to the left of": ax2 <= bx1, "to the right of": bx2 <= ax1, "above": ay2 <= by1,
            "below": by2 <= ay1}[relation]


def test_synthetic_captions_match_regions(tokenizer):
    embeddings = class_embeddings(seed=3)
    relations_seen, lengths = set(), []
    for record in generate(200, seed=3):
        objects = list(record["objects"])
        # The detector-like distribution and the features both identify each region's class.
        assert (record["cls_prob"].argmax(axis=1) == np.array(CLASS_INDEX)[objects]).all()
        np.testing.assert_allclose(record["cls_prob"].sum(axis=1), 1.0, rtol=1e-5)
        distances = ((record["features"][:, None, :] - embeddings[None]) ** 2).sum(-1)  # (N, num_objects)
        assert (distances.argmin(axis=1) == objects).all()
        assert (record["features"] >= 0).all()
        w, h = record["image_w"], record["image_h"]
        assert (record["boxes"][:, :2] >= 0).all() and (record["boxes"][:, 2] <= w).all()
        assert (record["boxes"][:, 3] <= h).all()
        for caption in record["captions"]:
            named, relation = parse_caption(caption)
            assert all(k in objects for k in named), (caption, [OBJECT_NAMES[k] for k in objects])
            assert len(set(named)) == len(named) and 2 <= len(named) <= min(len(objects), MAX_NAMED), caption
            if relation:
                a, b = (record["boxes"][objects.index(k)] for k in named[:2])
                assert box_relation_holds(relation, a, b), (caption, a, b)
                relations_seen.add(relation)
            lengths.append(len(tokenizer.encode(caption, 64)))
            assert tokenizer.unk_id not in tokenizer.encode(caption, 64)
    assert relations_seen == set(RELATIONS)
    assert max(lengths) <= 20  # 18 word pieces at most + [CLS] + [SEP]: short captions keep the CPU demo fast


def test_synthetic_is_deterministic_from_seed():
    a, b, c = make_image(5, 17), make_image(5, 17), make_image(6, 17)
    for key in ("features", "boxes", "cls_prob"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["captions"] == b["captions"]
    assert not np.array_equal(a["boxes"][:1], c["boxes"][:1])
    # Image i depends only on (seed, i): a small store is a prefix of a larger one.
    assert next(iter(generate(3, seed=5)))["captions"] == make_image(5, 0)["captions"]


def _ensure(path, queue):
    queue.put(ensure_default_data(path, num_images=30, seed=1))


def test_ensure_default_data_is_atomic_across_processes(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "synthetic"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_ensure, args=(str(path), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert [queue.get(timeout=5) for _ in workers] == [str(path)] * 2
    assert len(open_store(path)) == 30 and not list(path.parent.glob("*.partial-*"))
    monkeypatch.setenv("VILBERT_DATA", str(path))
    assert ensure_default_data() == str(path)  # present: reused, not rewritten


# ---------------------------------------------------------------------------------------------------- samples


def test_sample_invariants(synthetic_store, tokenizer):
    dataset = PretrainDataset(synthetic_store, tokenizer, seed=1)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            s = dataset[i]
            record = synthetic_store[i]
            n = len(record["features"])
            ids, labels = s["input_ids"], s["mlm_labels"]
            assert ids.dtype == labels.dtype == torch.int64 and s["image_features"].dtype == torch.float32
            assert s["image_features"].shape == (n + 1, 2048) and s["region_mask"].shape == (n + 1,)
            assert s["region_targets"].shape == (int(s["region_mask"].sum()), 1601)
            # [CLS]/[SEP] are never targets, targets are real word pieces.
            assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
            assert labels[0] == labels[-1] == IGNORE_INDEX
            targets = labels[labels != IGNORE_INDEX]
            assert not any(t in tokenizer.special_ids for t in targets.tolist())
            # Boxes are never masked; the IMG token's location is the whole image.
            locations = s["image_locations"].numpy()
            np.testing.assert_array_equal(locations[0], [0, 0, 1, 1, 1])
            np.testing.assert_array_equal(locations[1:], image_locations(record["boxes"], record["image_w"],
                                                                         record["image_h"]))
            # Masked regions are zeroed or unchanged; unmasked regions are unchanged.
            features, mask = s["image_features"][1:].numpy(), s["region_mask"][1:].numpy()
            assert not s["region_mask"][0]
            zeroed = (features == 0).all(axis=1)
            assert not (zeroed & ~mask).any()
            np.testing.assert_array_equal(features[~zeroed], record["features"][~zeroed])
            # The IMG token is the mean of the regions after masking.
            np.testing.assert_allclose(s["image_features"][0].numpy(), features.mean(axis=0), rtol=1e-6, atol=1e-6)
            # Targets: the (renormalized) detector distributions of the masked regions, in order.
            region_targets = s["region_targets"].numpy()
            assert region_targets.dtype == np.float32
            np.testing.assert_allclose(region_targets.sum(axis=1), 1.0, rtol=1e-5)
            np.testing.assert_allclose(region_targets, record["cls_prob"][mask], rtol=2e-3, atol=1e-6)


def test_masking_rates_match_the_paper(tmp_path, tokenizer):
    # Long captions and 36 regions per image: enough draws that 4 sigma is a few percent.
    rng = np.random.default_rng(0)
    words = [tokenizer.decode([i]) for i in tokenizer.word_ids[:60]]
    captions = [" ".join(rng.choice(words, size=34)) for _ in range(60)]
    store = captioned_store(tmp_path / "s", 60, num_boxes=36, captions=captions)
    dataset = PretrainDataset(store, tokenizer, seed=2)
    words = chosen = masked = replaced = kept = 0
    regions = chosen_regions = zeroed = aligned = samples = 0
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            s = dataset[i]
            ids, labels = s["input_ids"].numpy(), s["mlm_labels"].numpy()
            target = labels != IGNORE_INDEX
            words += len(ids) - 2
            chosen += target.sum()
            masked += (ids[target] == tokenizer.mask_id).sum()
            kept += (ids[target] == labels[target]).sum()
            replaced += ((ids[target] != labels[target]) & (ids[target] != tokenizer.mask_id)).sum()
            assert np.isin(ids[target & (ids != tokenizer.mask_id)], tokenizer.word_ids).all()
            mask = s["region_mask"].numpy()[1:]
            regions += len(mask)
            chosen_regions += mask.sum()
            zeroed += (s["image_features"].numpy()[1:][mask] == 0).all(axis=1).sum()
            aligned += int(s["is_aligned"])
            samples += 1

    def assert_rate(count, total, p, what):
        sigma = np.sqrt(p * (1 - p) / total)
        assert abs(count / total - p) < 4 * sigma, f"{what}: {count}/{total} = {count / total:.4f}, expected {p}"

    assert_rate(chosen, words, 0.15, "masked word pieces")
    assert_rate(masked, chosen, 0.8, "-> [MASK]")
    # A random replacement equals the original with probability 1/len(word_ids): counted as kept.
    p_same = 0.1 / len(tokenizer.word_ids)
    assert_rate(replaced, chosen, 0.1 - p_same, "-> random word piece")
    assert_rate(kept, chosen, 0.1 + p_same, "unchanged")
    assert_rate(chosen_regions, regions, 0.15, "masked regions")
    assert_rate(zeroed, chosen_regions, 0.9, "masked regions zeroed")
    assert_rate(aligned, samples, 0.5, "aligned captions")


def captioned_store(path, count, num_boxes=4, captions=None):
    """A native store whose image i has the caption "image <digits of i>", so a swapped caption names its source."""
    rng = np.random.default_rng(0)
    with StoreWriter(path) as writer:
        for i in range(count):
            n = num_boxes if np.isscalar(num_boxes) else num_boxes[i]
            writer.add({"image_id": str(i), "image_w": 100, "image_h": 50,
                        "features": rng.uniform(0, 2, size=(n, 2048)).astype(np.float32),
                        "boxes": np.tile(np.array([[10, 5, 60, 45]], dtype=np.float32), (n, 1)),
                        "cls_prob": rng.dirichlet(np.ones(1601), size=n).astype(np.float32),
                        "captions": [captions[i] if captions else "image " + " ".join(str(i))]})
    return open_store(path)


def test_swapped_caption_comes_from_another_image(tmp_path, tokenizer, monkeypatch):
    store = captioned_store(tmp_path / "s", 12)
    monkeypatch.setattr(pretrain_module, "TOKEN_MASK_PROB", 0.0)
    for count in (12, 2):
        dataset = PretrainDataset(store if count == 12 else [store[0], store[1]], tokenizer, seed=0)
        sources = []
        for epoch in range(10):
            dataset.set_epoch(epoch)
            for i in range(count):
                s = dataset[i]
                source = int(tokenizer.decode(s["input_ids"]).replace("image", "").replace(" ", ""))
                assert (source == i) == bool(s["is_aligned"])
                sources.append(source)
        assert set(sources) == set(range(count))
    with pytest.raises(ValueError, match=">= 2 records"):
        PretrainDataset([store[0]], tokenizer)


def test_drop_masked_loss_on_negatives(synthetic_store, tokenizer):
    plain = PretrainDataset(synthetic_store, tokenizer, seed=4)
    dropping = PretrainDataset(synthetic_store, tokenizer, seed=4, drop_masked_loss_on_negatives=True)
    negatives = 0
    for i in range(40):
        a, b = plain[i], dropping[i]
        for key in ("input_ids", "image_features", "is_aligned"):
            assert torch.equal(a[key], b[key])  # same random draws, same inputs
        if a["is_aligned"]:
            assert torch.equal(a["mlm_labels"], b["mlm_labels"]) and torch.equal(a["region_mask"], b["region_mask"])
        else:
            negatives += 1
            assert (b["mlm_labels"] == IGNORE_INDEX).all() and not b["region_mask"].any()
            assert b["region_targets"].shape == (0, 1601)
    assert negatives > 5


def test_samples_are_deterministic_and_order_independent(synthetic_store, tokenizer):
    a = PretrainDataset(synthetic_store, tokenizer, seed=9)
    b = PretrainDataset(synthetic_store, tokenizer, seed=9)
    forward = [a[i] for i in range(10)]
    backward = [b[i] for i in reversed(range(10))][::-1]
    for x, y in zip(forward, backward):
        for key in x:
            assert torch.equal(x[key], y[key]), key
    a.set_epoch(1)
    assert any(not torch.equal(a[i]["input_ids"], forward[i]["input_ids"]) or
               not torch.equal(a[i]["region_mask"], forward[i]["region_mask"]) for i in range(10))
    c = PretrainDataset(synthetic_store, tokenizer, seed=10)
    assert any(not torch.equal(c[i]["region_mask"], forward[i]["region_mask"]) for i in range(10))


def test_max_regions_and_max_text_len(tmp_path, tokenizer):
    long_caption = " ".join(["a dog"] * 30)
    store = captioned_store(tmp_path / "s", 3, num_boxes=[50, 1, 36], captions=[long_caption] * 3)
    dataset = PretrainDataset(store, tokenizer, max_text_len=36, max_regions=36)
    lens = [(len(dataset[i]["input_ids"]), len(dataset[i]["image_features"])) for i in range(3)]
    assert lens == [(36, 37), (36, 2), (36, 37)]
    # One real region: the IMG token equals it (or zeros, when masked and zeroed).
    s = dataset[1]
    np.testing.assert_allclose(s["image_features"][0], s["image_features"][1], atol=1e-6)
    with pytest.raises(ValueError, match=r"max_text_len must be >= 3 \(\[CLS\], a word piece, \[SEP\]\), got 2"):
        PretrainDataset(store, tokenizer, max_text_len=2)
    with pytest.raises(ValueError, match="max_regions must be >= 1, got 0"):
        PretrainDataset(store, tokenizer, max_regions=0)


def test_collator_pads_at_the_end(synthetic_store, tokenizer):
    dataset = PretrainDataset(synthetic_store, tokenizer, seed=0)
    samples = [dataset[i] for i in range(6)]
    batch = PretrainCollator()(samples)
    B = len(samples)
    T = max(len(s["input_ids"]) for s in samples)
    V = max(len(s["image_features"]) for s in samples)
    M = sum(len(s["region_targets"]) for s in samples)
    expected = {"input_ids": (B, T), "token_type_ids": (B, T), "text_lens": (B,), "image_features": (B, V, 2048),
                "image_locations": (B, V, 5), "image_lens": (B,), "mlm_labels": (B, T),
                "region_targets": (M, 1601), "region_mask": (B, V), "is_aligned": (B,)}
    assert {k: tuple(v.shape) for k, v in batch.items()} == expected
    for key, dtype in (("input_ids", torch.int64), ("text_lens", torch.int64), ("image_lens", torch.int64),
                       ("image_features", torch.float32), ("region_mask", torch.bool), ("is_aligned", torch.int64)):
        assert batch[key].dtype == dtype
    for row, s in enumerate(samples):
        t, v = len(s["input_ids"]), len(s["image_features"])
        assert batch["text_lens"][row] == t and batch["image_lens"][row] == v
        assert torch.equal(batch["input_ids"][row, :t], s["input_ids"])
        assert (batch["input_ids"][row, t:] == tokenizer.pad_id).all()
        assert (batch["mlm_labels"][row, t:] == IGNORE_INDEX).all()
        assert torch.equal(batch["image_features"][row, :v], s["image_features"])
        assert (batch["image_features"][row, v:] == 0).all() and (batch["image_locations"][row, v:] == 0).all()
        assert torch.equal(batch["region_mask"][row, :v], s["region_mask"]) and not batch["region_mask"][row, v:].any()
    # The targets' rows follow region_mask's True entries in row-major (b, v) order, as the model takes them.
    assert torch.equal(batch["region_targets"], torch.cat([s["region_targets"] for s in samples]))
    assert batch["region_mask"].sum() == M
    with pytest.raises(ValueError, match="non-empty"):
        PretrainCollator()([])


def test_image_locations_formula():
    locations = image_locations(np.array([[10, 20, 110, 70]], dtype=np.float32), image_w=200, image_h=100)
    np.testing.assert_allclose(locations, [[0.05, 0.2, 0.55, 0.7, 100 * 50 / (200 * 100)]], rtol=1e-6)


def test_bad_records_raise_or_are_skipped(tmp_path, tokenizer):
    store = captioned_store(tmp_path / "s", 6)
    records = [store[i] for i in range(6)]
    records[2] = {k: v for k, v in records[2].items() if k != "captions"}  # missing caption
    records[4] = {**records[4], "features": np.full((4, 2048), np.nan, dtype=np.float32)}
    dataset = PretrainDataset(records, tokenizer)
    with pytest.raises(BadRecordError, match=r"record 2 \(image_id '2'\).*no captions"):
        dataset[2]
    with pytest.raises(BadRecordError, match=r"record 4 \(image_id '4'\).*NaN"):
        dataset[4]
    skipping = PretrainDataset(records, tokenizer, skip_bad=True)
    with pytest.warns(UserWarning, match="record 2"):
        s = skipping[2]
    assert skipping.num_skipped >= 1 and len(s["image_features"]) == 5
    # In a DataLoader worker the error still names the record.
    loader = DataLoader(dataset, batch_size=2, collate_fn=PretrainCollator(), num_workers=1,
                        multiprocessing_context="fork")
    with pytest.raises(BadRecordError, match=r"record 2 \(image_id '2'\)"):
        list(loader)


def test_dataloader_workers_read_the_store(synthetic_store, tokenizer):
    """Forked workers reopen the LMDB the parent already used; the batches equal the single-process ones."""
    dataset = PretrainDataset(synthetic_store, tokenizer, seed=0)
    dataset[0]  # the parent holds an open handle when the workers fork
    sampler = ResumableSampler(len(dataset), seed=0, rank=0, world_size=1, micro_batch_size=8)
    order = [b for b, _ in zip(sampler, range(4))]
    loader = DataLoader(dataset, batch_sampler=order, collate_fn=PretrainCollator(), num_workers=2,
                        multiprocessing_context="fork")
    collate = PretrainCollator()
    for indices, batch in zip(order, loader):
        expected = collate([dataset[i] for i in indices])
        for key in expected:
            assert torch.equal(batch[key], expected[key]), key
