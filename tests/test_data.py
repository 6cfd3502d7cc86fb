"""Data pipeline: stdlib corpus, sources (all of the text; Megatron .bin/.idx blends through Megatron-Core),
tokenizers, packing, split, DP sharding, resume, the bigram baseline."""

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
    IndexedSamples,
    PackedTokens,
    bigram_conditional_entropy,
    build_data,
    read_documents,
    stdlib_corpus_path,
)
from tests.multirank import run_ranks


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


def test_a_cap_is_only_applied_when_asked_and_warns(corpus_dir: str) -> None:
    with pytest.warns(UserWarning, match="max_bytes=10000: 'stdlib' holds more text"):
        docs = read_documents(DataConfig(cache_dir=corpus_dir, max_bytes=10_000))
    assert sum(len(d.encode()) for d in docs) == 10_000 and len(docs) > 1


def test_a_12_mb_jsonl_yields_all_of_its_tokens(tmp_path: Path) -> None:
    path, texts = tmp_path / "big.jsonl", []
    with path.open("w") as f:
        for i in range(12_000):
            texts.append(f"document {i}: naïve café " * 40)  # ~1 KB of UTF-8 with 2-byte characters
            f.write(json.dumps({"text": texts[-1], "id": i}) + "\n")
    assert path.stat().st_size > 12_000_000
    data, _ = build_data(DataConfig(source=str(path), seq_len=128))
    stream = np.asarray(data.tokens)
    assert len(stream) == sum(len(t.encode()) for t in texts) + len(texts)  # every byte and one EOD each
    assert np.count_nonzero(stream == BYTE_EOD_ID) == 12_000
    tail = bytes(stream[-len(texts[-1].encode()) - 1 : -1].astype(np.uint8)).decode()
    assert tail == texts[-1]


def test_stdlib_data_and_entropy(corpus_dir: str) -> None:
    data, tokenizer = build_data(DataConfig(cache_dir=corpus_dir, seq_len=128))
    assert tokenizer.vocab_size == data.vocab_size == 257
    assert np.count_nonzero(np.asarray(data.tokens) == BYTE_EOD_ID) > 100  # one EOD per module
    baseline = data.bigram_baseline()
    assert not baseline.sampled and baseline.label == "byte-bigram conditional entropy"
    assert 2.0 < baseline.nats < 3.2  # nats; log(257) = 5.55
    assert baseline.nats == pytest.approx(bigram_conditional_entropy(data.tokens), abs=0.02)
    sample = data.bigram_baseline(max_tokens=200_000)  # a sample spread over the whole stream
    assert sample.sampled and sample.tokens <= 200_000 and "0.2 M-token sample" in sample.label
    assert sample.nats == pytest.approx(baseline.nats, abs=0.1)


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
    assert data.bigram_baseline().nats == pytest.approx(bigram_conditional_entropy(windows))


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
    label = data.bigram_baseline().label
    assert label == f"token-bigram ({tmp_path.name}/tokenizer.json) conditional entropy"
    assert hf.vocab_size == data.vocab_size == 10 and hf.eod_id == tok.token_to_id("</s>")
    assert len(data.tokens) == 451 and hf.decode(np.asarray(data.tokens[:3]).tolist()) == "the quick brown"
    with pytest.raises(ValueError, match="eod_token"):
        build_data(dataclasses.replace(config, eod_token="<nope>"))


def _indexed(prefix: Path, first_token: int, num_docs: int = 100, doc_len: int = 50) -> str:
    """A Megatron .bin/.idx pair whose document ``d`` is ``doc_len`` tokens ``first_token + d``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in range(num_docs):
        builder.add_document(torch.full((doc_len,), first_token + doc), [doc_len])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_megatron_blend_follows_weights_split_and_cache(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    a, b = _indexed(tmp_path / "a_text_document", 0), _indexed(tmp_path / "b_text_document", 100)
    config = DataConfig(source=[0.3, a, 0.7, b + ".bin"], seq_len=16, split="90,10,0", seed=3,
                        cache_dir=str(tmp_path / "cache"))
    data, _ = build_data(config, num_samples=(2000, 64))
    assert isinstance(data, IndexedSamples) and data.num_train_samples >= 2000 and data.num_val_samples >= 64
    inputs, targets = data.train_batch(0, 2000)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    from_a = (inputs[:, 0] < 100).float().mean().item()  # a sample never mixes the two prefixes
    assert from_a == pytest.approx(0.3, abs=0.02)
    val_inputs = torch.cat([x for x, _ in data.val_batches(8)])
    train_docs, val_docs = inputs.unique() % 100, val_inputs.unique() % 100
    assert train_docs.max() < 90 <= val_docs.min()  # the split string splits each prefix's documents
    cached = {p.name.split("-", 1)[1] for p in (tmp_path / "cache" / "megatron_indices").glob("*.npy")}
    assert {"BlendedDataset-train-dataset_index.npy", "GPTDataset-train-shuffle_index.npy"} <= cached
    again, _ = build_data(config, num_samples=(2000, 64))  # from the cache: the same samples
    for step, rank in ((0, 0), (7, 1), (300, 1)):  # a pure function of the step, disjoint over ranks
        batch = again.train_batch(step, 4, dp_rank=rank, dp_size=2)
        assert torch.equal(batch[0], data.train_batch(2 * step + rank, 4)[0])
    baseline = data.bigram_baseline(max_tokens=16 * 100)
    assert baseline.sampled and baseline.tokens == 1600 and baseline.label.startswith("byte-bigram")
    # Two gloo ranks build the same blend with a fresh cache (rank 0 builds, rank 1 reads its files).
    ranks_config = dataclasses.replace(config, cache_dir=str(tmp_path / "ranks_cache"))
    for rank, (train, val) in enumerate(run_ranks(_rank_batches, 2, ranks_config, timeout_s=180)):
        for step, inputs in train.items():
            assert np.array_equal(inputs, data.train_batch(2 * step + rank, 4)[0].numpy()), (rank, step)
        assert np.array_equal(val, data.val_samples(np.arange(rank, 8, 2))[0].numpy())


def _rank_batches(config: DataConfig) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """This rank's training inputs at a few steps and its first validation batch (runs on a gloo rank)."""
    import torch.distributed as dist

    data, _ = build_data(config, num_samples=(2000, 64))
    train = {step: data.train_batch(step, 4, dist.get_rank(), 2)[0].numpy() for step in (0, 7, 300)}
    return train, next(data.val_batches(4, dist.get_rank(), 2))[0].numpy()


def test_megatron_sources_are_checked_by_name(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    prefix = _indexed(tmp_path / "tokens", 0, num_docs=20)
    data, _ = build_data(DataConfig(source=prefix, seq_len=20, val_fraction=0.1, cache_dir=str(tmp_path)))
    assert data.num_train_samples == (18 * 50 - 1) // 20  # one epoch of the first 18 documents
    Path(prefix + ".idx").rename(tmp_path / "elsewhere.idx")
    with pytest.raises(ValueError, match=r"^source: .*tokens.bin has no tokens.idx beside it"):
        build_data(DataConfig(source=prefix + ".bin"))
    (tmp_path / "lone.idx").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^source: .*lone.idx has no lone.bin beside it"):
        build_data(DataConfig(source=[1.0, str(tmp_path / "lone"), 1.0, str(tmp_path / "missing")]))
    with pytest.raises(ValueError, match=r"^source: blend member .*missing.* has no .bin/.idx pair"):
        build_data(DataConfig(source=[str(tmp_path / "missing"), str(tmp_path / "missing2")]))
    big = _indexed(tmp_path / "wide", 250, num_docs=20)
    with pytest.raises(ValueError, match=r"^tokenizer: the indexed dataset holds id 2\d\d >= vocab size 257"):
        build_data(DataConfig(source=big, seq_len=20, cache_dir=str(tmp_path)))
    (tmp_path / "text.txt").write_text("some text " * 100)
    with pytest.raises(ValueError, match=r"^split: is for Megatron"):
        build_data(DataConfig(source=str(tmp_path / "text.txt"), split="9,1"))


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("seq_len", dict(seq_len=0)),
        ("val_fraction", dict(val_fraction=1.0)),
        ("max_bytes", dict(max_bytes=0)),
        ("split", dict(split="98,2,x")),
        ("split", dict(split="0,1")),
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
