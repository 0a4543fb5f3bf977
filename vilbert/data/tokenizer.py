"""BERT WordPiece tokenization from a local vocab file (no hub access), lower-cased as bert-base-uncased.

`load_tokenizer()` with no argument loads `synthetic_vocab.txt`, the small vocab shipped for the built-in data: the
special tokens, every word of the synthetic captions, a few common words, and the letters and digits (also as "##"
continuations) so an unseen word becomes word pieces, not [UNK]. For real data pass bert-base-uncased's vocab.txt.
"""
from __future__ import annotations

import os

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SHIPPED_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic_vocab.txt")


class WordPieceTokenizer:
    """BERT's uncased WordPiece tokenizer over a vocab file (one token per line, id = line number).

    Attributes: vocab_size; pad_id, unk_id, cls_id, sep_id, mask_id; word_ids (int64 array of the ids that are real
    word pieces: not special tokens and not BERT's "[unused...]" placeholders; the random replacements of masking).
    """

    def __init__(self, vocab_file: str | os.PathLike, lowercase: bool = True):
        self.vocab_file = os.fspath(vocab_file)
        with open(self.vocab_file, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        vocab = {token: i for i, token in enumerate(tokens)}
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"vocab file {self.vocab_file!r} lacks the special tokens {missing}")
        tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                          strip_accents=None, lowercase=lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        # Registered as special (ids unchanged): never split, and dropped by decode.
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
        self._tokenizer = tokenizer
        self.vocab_size = len(tokens)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in SPECIAL_TOKENS)
        self.special_ids = frozenset(i for t, i in vocab.items() if t.startswith("[") and t.endswith("]"))
        self.word_ids = np.array(sorted(set(range(self.vocab_size)) - self.special_ids), dtype=np.int64)

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, max_len: int) -> list[int]:
        """[CLS] word pieces [SEP], the word pieces cut so the whole is at most max_len (>= 2) ids."""
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids[: max_len - 2]
        return [self.cls_id, *ids, self.sep_id]

    def decode(self, ids) -> str:
        """Text of `ids` without special tokens or padding."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self):
        return f"WordPieceTokenizer({self.vocab_file!r}, vocab_size={self.vocab_size})"


def load_tokenizer(vocab_file: str | os.PathLike | None = None) -> WordPieceTokenizer:
    """The tokenizer for `vocab_file` (a BERT vocab.txt), or for the vocab shipped with the built-in data if None."""
    return WordPieceTokenizer(SHIPPED_VOCAB if vocab_file is None else vocab_file)
