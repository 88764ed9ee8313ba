"""The GPT-2 BPE through tiktoken, built offline from the ranks file shipped inside the package."""

from __future__ import annotations

import functools
from importlib import resources

import tiktoken
from tiktoken.load import load_tiktoken_bpe

EOT_TOKEN = 50256
# GPT-2's pre-tokenisation regex (the one tiktoken's "gpt2" encoding uses).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """encode / encode_batch / decode over tiktoken; <|endoftext|> is only special when asked for."""

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.eot_token = encoding.eot_token
        self.n_vocab = encoding.n_vocab

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of text; with allow_special, '<|endoftext|>' becomes the EOT id, else it is plain text."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], allow_special: bool = False, num_threads: int = 8) -> list[list[int]]:
        """encode over many texts on tiktoken's thread pool."""
        if allow_special:
            return self.encoding.encode_batch(texts, num_threads=num_threads, allowed_special="all")
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, tokens) -> str:
        return self.encoding.decode([int(t) for t in tokens])

    def decode_bytes(self, tokens) -> bytes:
        """The raw bytes of tokens; a token can end inside a UTF-8 character, so streaming decodes bytes."""
        return self.encoding.decode_bytes([int(t) for t in tokens])


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> Tokenizer:
    """The GPT-2 tokenizer (50,257 tokens), needing no network."""
    path = resources.files("gpt2_jax") / "assets" / "gpt2.tiktoken"
    with resources.as_file(path) as ranks_file:
        ranks = load_tiktoken_bpe(str(ranks_file))
    encoding = tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT_TOKEN})
    return Tokenizer(encoding)
