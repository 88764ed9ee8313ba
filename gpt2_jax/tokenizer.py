"""The GPT-2 BPE through tiktoken, built offline from the ranks file shipped inside the package."""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib import resources

import tiktoken

EOT_TOKEN = 50256
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base: GPT-2's
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
    """The GPT-2 tokenizer (50,257 tokens), needing no network and writing nothing."""
    # Read here, not with tiktoken's load_tiktoken_bpe: that copies the file into TIKTOKEN_CACHE_DIR (default
    # the temp directory) and raises where that directory cannot be written.
    contents = (resources.files("gpt2_jax") / "assets" / "gpt2.tiktoken").read_bytes()
    if (digest := hashlib.sha256(contents).hexdigest()) != RANKS_SHA256:
        raise ValueError(f"gpt2_jax/assets/gpt2.tiktoken has sha256 {digest}; GPT-2's ranks have {RANKS_SHA256}")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in contents.splitlines())}
    encoding = tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT_TOKEN})
    return Tokenizer(encoding)
