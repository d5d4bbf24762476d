"""A tiny offline BERT WordPiece tokenizer for tests (import as ``from tiny import make_tiny_tokenizer``)."""

from __future__ import annotations

from pathlib import Path

from transformers import BertTokenizerFast, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Fixture words (tests/glue_fixtures.py WORDS) plus a few more, punctuation and digits.
WORDS = (
    "the", "cat", "dog", "sat", "on", "a", "mat", "movie", "was", "good", "bad", "very", "not", "it",
    "is", "fun", "man", "saw", "bird", "big", "small", "red", "house", "ran",
    "and", "of", "to", "in", "he", "she", "said", "what", "who", "film", "story", "great",
    ".", ",", "?", "!", "'", '"', "-", "(", ")", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
    "##s", "##ed", "##ing",
)  # fmt: skip
VOCAB = SPECIAL_TOKENS + WORDS
# The training flags of every CLI test: short inputs, small batches, one epoch, the CPU, no progress bar.
TINY = ["--max-seq-length", "32", "--batch-size", "4", "--epochs", "1", "--quiet", "--device", "cpu"]


def make_tiny_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Write ``vocab.txt`` into ``path``, build a lower-casing BertTokenizerFast from it and
    ``save_pretrained`` it there, so ``AutoTokenizer.from_pretrained(path)`` reloads it offline.
    ``[PAD]`` is id 0; ``len(tokenizer) == len(VOCAB)``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    # from_pretrained on the folder reads vocab.txt on every transformers version (v5 ignores vocab_file=).
    tokenizer = BertTokenizerFast.from_pretrained(str(path), model_max_length=512)
    tokenizer.save_pretrained(str(path))
    return tokenizer
