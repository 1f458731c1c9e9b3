"""Shared data fixtures: a small generated English corpus and a tokenizer trained on it once."""

import random

import pytest

from jaxllm.data.tokenizer import Tokenizer, train_tokenizer

WORDS = (
    "the", "a", "an", "cat", "dog", "bird", "runs", "jumps", "flies", "over", "under", "lazy", "quick",
    "brown", "small", "river", "stone", "tree", "house", "light", "dark", "morning", "evening",
    "people", "speak", "write", "read", "function", "returns", "value", "list", "string", "number",
    "module", "class", "method", "object", "file", "data", "is", "are", "was", "were", "and", "or",
    "but", "with", "from", "into", "of", "to", "in", "on"
)
VOCAB_SIZE = 400


def make_sentences(count: int, seed: int = 0) -> list[str]:
    """Deterministic simple English sentences."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
        for _ in range(count)
    ]


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return make_sentences(400)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, sentences):
    prefix = tmp_path_factory.mktemp("tokenizer") / "tok"
    return train_tokenizer(sentences, prefix, vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer.load(tokenizer_path)
