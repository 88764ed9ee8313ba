"""The offline GPT-2 tokenizer against known token ids and the bundled corpus."""

from pathlib import Path

from gpt2_jax.tokenizer import get_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "shakespeare.txt"


def test_known_ids():
    tok = get_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_token == 50256 and tok.n_vocab == 50257
    assert tok.encode(" the") == [262]
    assert tok.decode([15496, 995]) == "Hello world"


def test_builds_offline_where_tiktoken_cannot_cache(tmp_path, monkeypatch):
    # tiktoken's loader copies a ranks file into TIKTOKEN_CACHE_DIR and fails where that cannot be written.
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "a_file"))
    tok = get_tokenizer.__wrapped__()
    assert tok.encode("Hello world") == [15496, 995] and tok.n_vocab == 50257


def test_special_tokens_only_when_asked():
    tok = get_tokenizer()
    text = "end<|endoftext|>start"
    assert 50256 not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text, allow_special=True) == tok.encode("end") + [50256] + tok.encode("start")


def test_encode_batch_equals_encode():
    tok = get_tokenizer()
    texts = ["To be, or not to be", "", "  spaces  and\nnewlines\n\n", "naïve café 日本語"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_shakespeare_round_trips():
    tok = get_tokenizer()
    text = CORPUS.read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert len(ids) == 1_566_041
    assert tok.decode(ids) == text
