"""Data pipeline: stdlib corpus, sources, tokenizers, packing, split, DP sharding, resume, bigram entropy."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ep_megatron.trainer.data import (
    BYTE_EOD_ID,
    DataConfig,
    PackedTokens,
    bigram_conditional_entropy,
    build_data,
    read_documents,
    stdlib_corpus_path,
)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = tmp_path_factory.mktemp("cache")
    stdlib_corpus_path(str(cache))
    return str(cache)


def packed(num_tokens: int = 1001, seq_len: int = 10, **overrides) -> PackedTokens:
    """A stream whose token is its position, so a window's id is ``inputs[:, 0] // seq_len``."""
    return PackedTokens(np.arange(num_tokens), num_tokens, DataConfig(seq_len=seq_len, **overrides))


def window_ids(batch: tuple[torch.Tensor, torch.Tensor], seq_len: int = 10) -> list[int]:
    inputs, targets = batch
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and torch.equal(targets[:, -1], inputs[:, -1] + 1)
    return (inputs[:, 0] // seq_len).tolist()


def test_stdlib_corpus_is_real_english(corpus_dir: str) -> None:
    path = stdlib_corpus_path(corpus_dir)
    assert stdlib_corpus_path(corpus_dir) == path  # cached
    docs = read_documents(DataConfig(cache_dir=corpus_dir))
    text = "\n".join(docs)
    data = text.encode("utf-8")
    assert len(data) > 500_000
    printable = sum(32 <= b < 127 or b in (9, 10) for b in data) / len(data)
    assert printable > 0.99
    words = text.lower().split()
    for word in ("the", "return", "file", "string", "object", "if"):
        assert words.count(word) > 500, word
    modules = [json.loads(line)["module"] for line in path.open()]
    assert modules == sorted(modules) and "json/__init__.py" in modules


def test_stdlib_corpus_cap(corpus_dir: str) -> None:
    docs = read_documents(DataConfig(cache_dir=corpus_dir, max_bytes=10_000))
    assert sum(len(d.encode()) for d in docs) <= 10_000 and len(docs) > 1


def test_stdlib_data_and_entropy(corpus_dir: str) -> None:
    data, tokenizer = build_data(DataConfig(cache_dir=corpus_dir, seq_len=128))
    assert tokenizer.vocab_size == data.vocab_size == 257
    assert np.count_nonzero(np.asarray(data.tokens) == BYTE_EOD_ID) > 100  # one EOD per module
    entropy = data.train_bigram_entropy()
    assert 2.0 < entropy < 3.2  # nats; log(257) = 5.55
    assert entropy == pytest.approx(bigram_conditional_entropy(data.tokens), abs=0.02)


def test_bigram_entropy_hand_computed() -> None:
    # "aaba": pairs aa, ab, ba; after 'a' next is a or b (1 bit each), after 'b' it is always 'a'.
    assert bigram_conditional_entropy(np.frombuffer(b"aaba", dtype=np.uint8)) == pytest.approx(
        2 / 3 * math.log(2)
    )
    assert bigram_conditional_entropy(torch.tensor([1, 2, 1, 2, 1])) == pytest.approx(0.0)
    assert bigram_conditional_entropy(np.array([10**7, 0, 10**7, 1])) == pytest.approx(2 / 3 * math.log(2))
    # rows are independent: no pair crosses from row 0's end to row 1's start
    assert bigram_conditional_entropy(np.array([[0, 1], [1, 0]])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="tokens"):
        bigram_conditional_entropy(np.array([3]))


def test_train_entropy_counts_train_windows_only() -> None:
    data = packed(seq_len=10, val_fraction=0.2)
    windows = np.stack([np.asarray(data.tokens[i * 10 : i * 10 + 11]) for i in data.train_windows])
    assert data.train_bigram_entropy() == pytest.approx(bigram_conditional_entropy(windows))


def test_split_is_disjoint_and_spread() -> None:
    data = packed(seq_len=10, val_fraction=0.1)
    assert len(data.train_windows) + len(data.val_windows) == 100
    assert data.val_windows.tolist() == list(range(9, 100, 10))
    assert not set(data.train_windows) & set(data.val_windows)
    assert len(packed(val_fraction=0.0).val_windows) == 0


def test_shards_disjoint_and_cover_one_epoch() -> None:
    data, batch, dp = packed(seq_len=10, val_fraction=0.1), 3, 4
    n = len(data.train_windows)  # 90 windows: 7.5 steps of 12
    per_step = [[window_ids(data.train_batch(step, batch, r, dp)) for r in range(dp)] for step in range(8)]
    for ranks in per_step:
        flat = [w for ids in ranks for w in ids]
        assert len(set(flat)) == len(flat)  # ranks disjoint within a step
    epoch = [w for ranks in per_step for ids in ranks for w in ids][:n]
    assert sorted(epoch) == data.train_windows.tolist()  # each training window exactly once per epoch
    assert not set(epoch) & set(data.val_windows.tolist())


def test_deterministic_and_resumable() -> None:
    a, b = packed(seed=7), packed(seed=7)
    for step in (0, 5, 40):  # 40 is past the first epoch
        assert all(
            torch.equal(x, y) for x, y in zip(a.train_batch(step, 4, 1, 2), b.train_batch(step, 4, 1, 2))
        )
    assert not torch.equal(a.train_batch(0, 4)[0], packed(seed=8).train_batch(0, 4)[0])
    stream = a.train_batches(4, dp_rank=1, dp_size=2)
    batches = [next(stream) for _ in range(30)]
    resumed = next(b.train_batches(4, dp_rank=1, dp_size=2, start_step=17))
    assert torch.equal(resumed[0], batches[17][0]) and torch.equal(resumed[1], batches[17][1])


def test_val_batches_equal_per_rank() -> None:
    data = packed(seq_len=10, val_fraction=0.1)  # 10 val windows
    shards = [[x for x, _ in data.val_batches(2, r, 3)] for r in range(3)]
    assert [sum(len(x) for x in s) for s in shards] == [3, 3, 3]
    assert [len(s) for s in shards] == [2, 2, 2]
    with pytest.raises(ValueError, match="val_fraction"):
        next(data.val_batches(2, 0, 11))


def test_text_dir_and_jsonl_sources(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second document " * 20)
    (tmp_path / "docs" / "a.txt").write_text("first document " * 20)
    data, tok = build_data(DataConfig(source=str(tmp_path / "docs"), seq_len=16, val_fraction=0.0))
    stream = np.asarray(data.tokens)
    assert tok.decode(stream[:15].tolist()) == "first document "
    assert np.flatnonzero(stream == BYTE_EOD_ID).tolist() == [300, 300 + 1 + 320]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"record {i} " * 10}) for i in range(5)))
    docs = read_documents(DataConfig(source=str(jsonl), jsonl_key="body"))
    assert docs[0].startswith("record 0") and len(docs) == 5
    with pytest.raises(ValueError, match="jsonl_key"):
        read_documents(DataConfig(source=str(jsonl)))


def test_hf_tokenizer(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    text = "the quick brown fox jumps over the lazy dog " * 50
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"])
    tok.train_from_iterator([text], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "corpus.txt").write_text(text)
    config = DataConfig(
        source=str(tmp_path / "corpus.txt"), tokenizer=str(tmp_path / "tokenizer.json"), seq_len=8
    )
    data, hf = build_data(config)
    assert hf.vocab_size == data.vocab_size == 10 and hf.eod_id == tok.token_to_id("</s>")
    assert len(data.tokens) == 451 and hf.decode(np.asarray(data.tokens[:3]).tolist()) == "the quick brown"
    with pytest.raises(ValueError, match="eod_token"):
        build_data(dataclasses.replace(config, eod_token="<nope>"))


def test_megatron_indexed_dataset_round_trip(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "tokens_text_document")
    docs = [torch.arange(i, i + 50) % 257 for i in range(0, 400, 50)]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    data, _ = build_data(DataConfig(source=prefix + ".bin", seq_len=20, val_fraction=0.0))
    assert np.array_equal(np.asarray(data.tokens), torch.cat(docs).numpy())
    stream = torch.cat(docs)
    inputs, targets = data.train_batch(0, 4)
    for row, target in zip(inputs, targets):  # every row is a window of the stream at a multiple of seq_len
        assert any(torch.equal(row, stream[w * 20 : w * 20 + 20]) for w in range(19))
        assert torch.equal(target[:-1], row[1:])
    with pytest.raises(ValueError, match="seq_len"):
        build_data(DataConfig(source=prefix, seq_len=300))


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("seq_len", dict(seq_len=0)),
        ("val_fraction", dict(val_fraction=1.0)),
        ("max_bytes", dict(max_bytes=0)),
        ("jsonl_key", dict(jsonl_key="")),
        ("source", dict(source="")),
    ],
)
def test_bad_config_names_field(field: str, overrides: dict) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        DataConfig(**overrides)


def test_bad_inputs_name_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^source:"):
        build_data(DataConfig(source=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="^source:.*no text"):
        build_data(DataConfig(source=str(tmp_path / "empty.txt")))
    with pytest.raises(ValueError, match="^tokenizer:"):
        build_data(DataConfig(source=str(tmp_path / "empty.txt"), tokenizer=str(tmp_path / "none.json")))
    data = packed()
    with pytest.raises(ValueError, match="^dp_rank:"):
        data.train_batch(0, 2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="^batch_size:"):
        data.train_batch(0, 0)
    with pytest.raises(ValueError, match="^step:"):
        data.train_batch(-1, 2)
