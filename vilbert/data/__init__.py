"""The data pipeline: region-feature stores, WordPiece tokenization, pretraining samples and batches, the resumable
distributed sampler, and the built-in synthetic data (`python -m vilbert.data --help` for the command line).

    from vilbert.data import (PretrainCollator, PretrainDataset, ResumableSampler, ensure_default_data,
                              load_tokenizer, open_store)
    store = open_store(ensure_default_data())
    dataset = PretrainDataset(store, load_tokenizer(), seed=0)
    sampler = ResumableSampler(len(dataset), seed=0, rank=0, world_size=1, micro_batch_size=32)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=PretrainCollator())
"""
from .pretrain import IGNORE_INDEX, PretrainCollator, PretrainDataset, image_locations
from .sampler import ResumableSampler
from .stores import (FORMATS, BadRecordError, NativeStore, OfficialFeatureLmdb, OfficialPretrainLmdb, StoreWriter,
                     TsvReader, convert, detect_format, load_captions, open_store, verify_store)
from .synthetic import default_data_path, ensure_default_data, write_synthetic
from .tokenizer import WordPieceTokenizer, load_tokenizer

__all__ = [
    "open_store", "detect_format", "convert", "load_captions", "verify_store", "FORMATS", "BadRecordError",
    "NativeStore", "StoreWriter", "TsvReader", "OfficialFeatureLmdb", "OfficialPretrainLmdb",
    "load_tokenizer", "WordPieceTokenizer",
    "PretrainDataset", "PretrainCollator", "image_locations", "IGNORE_INDEX",
    "ResumableSampler",
    "default_data_path", "ensure_default_data", "write_synthetic",
]
