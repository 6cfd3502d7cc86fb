"""Token data for pretraining: tokenizers, corpus sources, packing, validation split, DP sharding.

* Tokenizer: bytes by default (ids 0-255 are UTF-8 bytes, 256 is end-of-document: vocab 257), or a
  Hugging Face ``tokenizer.json`` read from a local file (needs the ``tokenizers`` package).
* Sources: the built-in corpus (``"stdlib"``: English docstrings of the Python standard library),
  a ``.txt`` file, a directory of ``.txt`` files, a ``.jsonl`` file, or a Megatron indexed dataset
  (``.bin/.idx`` prefix, already tokenized). Text documents are concatenated with an EOD token.
* Packing: the token stream is cut into windows of ``seq_len + 1`` tokens with stride ``seq_len``
  (input = window[:-1], target = window[1:]); every target token belongs to exactly one window.
* Validation split by contiguous chunk: a ``val_fraction`` of the windows, spread evenly over the
  stream (window ``i`` is held out when ``floor((i + 1) f) > floor(i f)``), never trained on.
* Sharding: each epoch is a seeded permutation of the training windows; sample ``g`` of the run is
  ``perm[epoch][g mod n]``, and rank ``r`` at step ``k`` takes samples ``(k * dp_size + r) * batch
  + [0, batch)``. A batch is a pure function of (seed, step, dp_rank, dp_size, batch): resuming
  needs only the step.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

STDLIB_SOURCE = "stdlib"
BYTE_EOD_ID = 256
_HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass
class DataConfig:
    """Where the tokens come from and how they are packed and split."""

    source: str = STDLIB_SOURCE  # "stdlib", a .txt file, a directory of .txt, a .jsonl, or a .bin/.idx prefix
    seq_len: int = 128  # tokens per training sequence (windows hold seq_len + 1)
    val_fraction: float = 0.05  # fraction of windows held out for validation, in [0, 1)
    seed: int = 1234  # seed of the per-epoch order of training windows
    tokenizer: str | None = None  # path to a local Hugging Face tokenizer.json; None = bytes (vocab 257)
    eod_token: str | None = None  # HF only: document separator; None = first of <|endoftext|>, </s>, <eos>
    jsonl_key: str = "text"  # JSONL field holding the document text
    max_bytes: int = 4_000_000  # cap on the UTF-8 text read from text sources (documents in order)
    cache_dir: str | None = None  # where the built-in corpus is cached; None = $EP_MEGATRON_CACHE or ~/.cache

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source: must be 'stdlib' or a path, got an empty string")
        if self.seq_len <= 0:
            raise ValueError(f"seq_len: must be > 0, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes: must be > 0, got {self.max_bytes}")
        if not self.jsonl_key:
            raise ValueError("jsonl_key: must be a non-empty field name")


# ---------------------------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    eod_id: int | None  # appended after every text document; None = documents are concatenated

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255 plus the end-of-document id 256."""

    vocab_size = 257
    eod_id = BYTE_EOD_ID

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a local ``tokenizer.json`` (never downloads)."""

    def __init__(self, path: str, eod_token: str | None = None) -> None:
        if not Path(path).is_file():
            raise ValueError(f"tokenizer: no tokenizer.json file at {path!r}")
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as err:
            raise ImportError(
                "tokenizer: reading a tokenizer.json needs the 'tokenizers' package: pip install tokenizers"
            ) from err
        self._tok = _Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod_id = self._find_eod(eod_token)

    def _find_eod(self, eod_token: str | None) -> int | None:
        if eod_token is not None:
            eod_id = self._tok.token_to_id(eod_token)
            if eod_id is None:
                raise ValueError(f"eod_token: {eod_token!r} is not in the tokenizer's vocabulary")
            return eod_id
        ids = (self._tok.token_to_id(t) for t in _HF_EOD_CANDIDATES)
        return next((i for i in ids if i is not None), None)

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(config: DataConfig) -> Tokenizer:
    """The byte tokenizer, or the HF tokenizer at ``config.tokenizer``."""
    if config.tokenizer is None:
        return ByteTokenizer()
    return HFTokenizer(config.tokenizer, config.eod_token)


# ---------------------------------------------------------------------------------------- built-in corpus


def _module_docstrings(path: Path) -> str:
    """The module, class and function docstrings of one source file, parsed (not imported)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return ""
    nodes = (n for n in ast.walk(tree) if isinstance(n, _DOC_NODES))
    docs = (ast.get_docstring(n) for n in nodes)
    return "\n\n".join(d for d in docs if d)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus_path(cache_dir: str | None = None) -> Path:
    """The built-in corpus as a JSONL file (one document per stdlib module), built on first use.

    Text: every docstring (``ast.get_docstring``) of the standard-library ``.py`` files of the running
    Python, tests and third-party packages excluded, modules in sorted path order. About 1.6 MB of
    English prose for CPython 3.11. Cached under ``cache_dir`` (default ``$EP_MEGATRON_CACHE`` or
    ``~/.cache/ep_megatron``), keyed by Python version and stdlib location; written atomically, so
    concurrent ranks may build it at the same time.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    key = hashlib.sha256(stdlib.encode()).hexdigest()[:10]
    root = Path(cache_dir or os.environ.get("EP_MEGATRON_CACHE") or Path.home() / ".cache" / "ep_megatron")
    path = root / f"stdlib-docstrings-py{platform.python_version()}-{key}-v1.jsonl"
    if path.is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for file in _stdlib_files():
            text = _module_docstrings(file)
            if text:
                f.write(json.dumps({"text": text, "module": file.relative_to(stdlib).as_posix()}) + "\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------- sources


def _iter_jsonl(path: Path, key: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get(key), str):
                raise ValueError(f"jsonl_key: line {line_no} of {path} has no text field {key!r}")
            yield record[key]


def _iter_text_documents(source: Path, config: DataConfig) -> Iterator[str]:
    if source.is_dir():
        for file in sorted(source.rglob("*.txt")):
            yield file.read_text(encoding="utf-8", errors="replace")
    elif source.suffix == ".jsonl":
        yield from _iter_jsonl(source, config.jsonl_key)
    else:
        yield source.read_text(encoding="utf-8", errors="replace")


def read_documents(config: DataConfig) -> list[str]:
    """The text documents of a text source in order, capped at ``max_bytes`` of UTF-8 in total."""
    if config.source == STDLIB_SOURCE:
        source = stdlib_corpus_path(config.cache_dir)
    else:
        source = Path(config.source)
        if not source.exists():
            raise ValueError(f"source: no file or directory at {config.source!r}")
    docs, budget = [], config.max_bytes
    for text in _iter_text_documents(source, config):
        data = text.encode("utf-8")[:budget]
        if data:
            docs.append(data.decode("utf-8", errors="ignore"))
            budget -= len(data)
        if budget <= 0:
            break
    if not docs:
        raise ValueError(f"source: {config.source!r} contains no text")
    return docs


def _megatron_prefix(source: str) -> str | None:
    prefix = source.removesuffix(".bin").removesuffix(".idx")
    return prefix if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file() else None


def read_indexed_dataset(prefix: str) -> np.ndarray:
    """``[num_tokens]``: the token stream of a Megatron indexed dataset, memory-mapped, documents as written.

    The index is read with Megatron-Core's ``IndexedDataset`` (dtype, sequence lengths); the ``.bin`` file
    is the concatenation of all sequences in index order, so the stream is a ``np.memmap`` of it (which
    owns its mapping; ``IndexedDataset`` closes its own when collected).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    count = int(dataset.sequence_lengths.sum())
    if count == 0:
        raise ValueError(f"source: the indexed dataset {prefix!r} holds no tokens")
    return np.memmap(prefix + ".bin", dtype=dataset.index.dtype, mode="r", shape=(count,))


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """``[num_tokens]``: the documents' tokens, each followed by the tokenizer's EOD id (if any)."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    eod = [np.array([tokenizer.eod_id], dtype=dtype)] if tokenizer.eod_id is not None else []
    parts = [p for ids in tokenizer.encode(docs) for p in (ids.astype(dtype), *eod)]
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------- bigram entropy


def bigram_conditional_entropy(tokens: np.ndarray | torch.Tensor) -> float:
    """Empirical ``H(X_{t+1} | X_t)`` in nats of ``tokens [n]`` or of the rows of ``tokens [rows, n]``.

    Pairs are taken along the last dimension only (rows are independent sequences). This is the loss of
    the best model that sees only the previous token, measured on the data it was counted on.
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.shape[-1] < 2:
        raise ValueError(f"tokens: need at least 2 tokens per row, got shape {tuple(tokens.shape)}")
    if tokens.min() < 0:
        raise ValueError("tokens: ids must be non-negative")
    vocab = int(tokens.max()) + 1
    return _conditional_entropy(*_pair_counts(tokens[..., :-1], tokens[..., 1:], vocab), vocab)


def _pair_counts(prev: np.ndarray, nxt: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, counts) [pairs]``: distinct pair codes ``prev * vocab + next`` and their counts."""
    return np.unique((prev.astype(np.int64) * vocab + nxt).ravel(), return_counts=True)


def _conditional_entropy(codes: np.ndarray, counts: np.ndarray, vocab: int) -> float:
    """``H(next | prev)`` in nats from pair ``codes [pairs]`` and ``counts [pairs]`` (codes may repeat).

    Sparse in the pairs seen, so any vocabulary size works.
    """
    codes, index = np.unique(codes, return_inverse=True)
    counts = np.bincount(index, weights=counts)
    _, prev_index = np.unique(codes // vocab, return_inverse=True)
    prev_totals = np.bincount(prev_index, weights=counts)[prev_index]
    return float(-(counts * np.log(counts / prev_totals)).sum() / counts.sum())


# ------------------------------------------------------------------------------------------------ packing


class PackedTokens:
    """A token stream packed into ``[seq_len + 1]`` windows, split into train/val, sharded over DP ranks.

    ``tokens [num_tokens]`` may be a memory map; batches are gathered on demand.
    """

    def __init__(self, tokens: np.ndarray, vocab_size: int, config: DataConfig) -> None:
        num_windows = (len(tokens) - 1) // config.seq_len
        if num_windows < 2:
            raise ValueError(
                f"seq_len: {config.seq_len} leaves {num_windows} window(s) of {len(tokens)} tokens; need >= 2"
            )
        self.tokens = tokens
        self.vocab_size = vocab_size
        self.seq_len = config.seq_len
        self.seed = config.seed
        index = np.arange(num_windows)
        is_val = np.floor((index + 1) * config.val_fraction) > np.floor(index * config.val_fraction)
        self.train_windows = np.flatnonzero(~is_val)
        self.val_windows = np.flatnonzero(is_val)
        self._order: tuple[int, np.ndarray] | None = None

    def _windows(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs [batch, seq], targets [batch, seq])`` int64 of the given windows."""
        positions = window_ids[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        windows = torch.from_numpy(np.asarray(self.tokens[positions], dtype=np.int64))
        return windows[:, :-1], windows[:, 1:]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, self.train_windows[rng.permutation(len(self.train_windows))])
        return self._order[1]

    def train_batch(
        self, step: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs [batch, seq], targets [batch, seq])``: rank ``dp_rank``'s micro-batch at ``step``.

        Ranks read disjoint samples; one epoch (``len(train_windows)`` samples of the global order)
        covers every training window once. Depends only on (seed, step, dp_rank, dp_size, batch_size).
        """
        _check_shard(batch_size, dp_rank, dp_size)
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        n = len(self.train_windows)
        samples = (step * dp_size + dp_rank) * batch_size + np.arange(batch_size)
        epochs, positions = np.divmod(samples, n)
        ids = np.array([self._epoch_order(int(e))[p] for e, p in zip(epochs, positions)])
        return self._windows(ids)

    def train_batches(
        self, batch_size: int, dp_rank: int = 0, dp_size: int = 1, start_step: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless ``train_batch(step, ...)`` for ``step = start_step, start_step + 1, ...``."""
        step = start_step
        while True:
            yield self.train_batch(step, batch_size, dp_rank, dp_size)
            step += 1

    def val_batches(
        self, batch_size: int, dp_rank: int = 0, dp_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's validation windows in stream order, ``(inputs, targets) [<=batch, seq]``.

        Rank ``r`` takes windows ``r, r + dp_size, ...``; the last ``len(val_windows) mod dp_size``
        windows are dropped so every rank yields the same number of batches (safe for collectives).
        """
        _check_shard(batch_size, dp_rank, dp_size)
        per_rank = len(self.val_windows) // dp_size
        if per_rank == 0:
            raise ValueError(
                f"val_fraction: {len(self.val_windows)} validation window(s) for dp_size={dp_size}; "
                "raise val_fraction or use a larger corpus"
            )
        shard = self.val_windows[dp_rank : per_rank * dp_size : dp_size]
        for start in range(0, per_rank, batch_size):
            yield self._windows(shard[start : start + batch_size])

    def train_bigram_entropy(self, chunk: int = 4096) -> float:
        """``bigram_conditional_entropy`` of the (input, target) pairs of all training windows, in nats.

        One pass over the training split, ``chunk`` windows at a time.
        """
        codes, counts = [], []
        for start in range(0, len(self.train_windows), chunk):
            inputs, targets = self._windows(self.train_windows[start : start + chunk])
            chunk_codes, chunk_counts = _pair_counts(inputs.numpy(), targets.numpy(), self.vocab_size)
            codes.append(chunk_codes)
            counts.append(chunk_counts)
        return _conditional_entropy(np.concatenate(codes), np.concatenate(counts), self.vocab_size)


def _check_shard(batch_size: int, dp_rank: int, dp_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be > 0, got {batch_size}")
    if dp_size <= 0:
        raise ValueError(f"dp_size: must be > 0, got {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank: must be in [0, {dp_size}), got {dp_rank}")


def build_data(config: DataConfig) -> tuple[PackedTokens, Tokenizer]:
    """Read, tokenize and pack ``config.source``. Indexed datasets are used as tokenized."""
    tokenizer = build_tokenizer(config)
    prefix = _megatron_prefix(config.source)
    if prefix is not None:
        tokens = read_indexed_dataset(prefix)
        if int(tokens.max()) >= tokenizer.vocab_size:
            raise ValueError(
                f"tokenizer: the indexed dataset holds id {int(tokens.max())} >= vocab size "
                f"{tokenizer.vocab_size}; pass the tokenizer.json it was made with"
            )
    else:
        tokens = tokenize_documents(read_documents(config), tokenizer)
    return PackedTokens(tokens, tokenizer.vocab_size, config), tokenizer


__all__ = [
    "BYTE_EOD_ID",
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "PackedTokens",
    "Tokenizer",
    "bigram_conditional_entropy",
    "build_data",
    "build_tokenizer",
    "read_documents",
    "read_indexed_dataset",
    "stdlib_corpus_path",
    "tokenize_documents",
]
