"""A CLIP tokenizer with the project's own byte-pair vocabulary.

CLIP's real vocabulary cannot be downloaded here, so the merges are learned from the base
model's caption phrases. The alphabet holds every byte (as CLIP's does), so any word, including
a rare identifier such as "sks", becomes real tokens rather than an unknown-token id.
"""

from __future__ import annotations

import itertools
from collections import Counter

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from `words`, most frequent pair first, ties broken by order."""
    byte_map = bytes_to_unicode()
    corpus = Counter()
    for word in words:
        symbols = [byte_map[b] for b in word.encode()]
        symbols[-1] += "</w>"
        corpus[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs = Counter()
        for symbols, freq in corpus.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda pair: pairs[pair])
        merges.append(best)
        merged = Counter()
        for symbols, freq in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += freq
        corpus = merged
    return merges


def build_tokenizer(phrases: list[str], num_merges: int = 200) -> CLIPTokenizer:
    """A `CLIPTokenizer` whose merges are learned from `phrases` (deterministic).

    Args:
        phrases (`list[str]`): the texts the model will be trained on.
        num_merges (`int`, defaults to 200): upper bound on learned merges.
    """
    alphabet = list(bytes_to_unicode().values())
    vocab_list = alphabet + [symbol + "</w>" for symbol in alphabet]
    words = [word for phrase in phrases for word in phrase.lower().split()]
    merges = _learn_merges(words, num_merges)
    vocab_list += ["".join(pair) for pair in merges]
    vocab_list += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = MAX_LENGTH
    return tokenizer
