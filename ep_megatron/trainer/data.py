"""Token data for pretraining: tokenizers, corpus sources, packing, validation split, DP sharding.

* Tokenizer: bytes by default (ids 0-255 are UTF-8 bytes, 256 is end-of-document: vocab 257), or a
  Hugging Face ``tokenizer.json`` read from a local file (needs the ``tokenizers`` package).
* Text sources: the built-in corpus (``"stdlib"``: English docstrings of the Python standard library),
  a ``.txt`` file, a directory of ``.txt`` files, or a ``.jsonl`` file. All of the text is read (a cap
  only when ``max_bytes`` asks for one, with a warning when it cuts); documents are concatenated with
  an EOD token and packed: the stream is cut into windows of ``seq_len + 1`` tokens with stride
  ``seq_len`` (input = window[:-1], target = window[1:]); every target token is in exactly one window.
  Validation: a ``val_fraction`` of the windows, spread evenly over the stream (window ``i`` is held out
  when ``floor((i + 1) f) > floor(i f)``), never trained on. Each epoch is a seeded permutation of the
  training windows.
* Megatron indexed datasets (already tokenized ``.bin/.idx`` pairs): one prefix, or a blend (Megatron's
  ``--data-path`` list: ``[weight, prefix, weight, prefix, ...]`` or prefixes only), through
  Megatron-Core's own ``GPTDataset`` / ``BlendedDataset`` built by ``BlendedMegatronDatasetBuilder``:
  Megatron's split string (documents per split), its shuffling and its index files cached under
  ``cache_dir``. Needs Megatron-Core (``pip install ep_megatron[megatron]`` or a Megatron-LM checkout).
* Sharding (both kinds): sample ``g`` of the run's sample order goes to rank ``r`` at step ``k`` when
  ``g`` is in ``(k * dp_size + r) * batch + [0, batch)``. A batch is a pure function of (seed, step,
  dp_rank, dp_size, batch), ranks read disjoint samples, and resuming needs only the step.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import platform
import sysconfig
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

STDLIB_SOURCE = "stdlib"
BYTE_EOD_ID = 256
BIGRAM_SAMPLE_TOKENS = 2_000_000  # the bigram baseline counts at most this many training targets
_HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_ENCODE_BATCH_BYTES = 1 << 23  # text encoded per tokenizer call (bounds the transient memory)
_VOCAB_CHECK_SAMPLES = 64  # indexed data: samples whose ids are checked against the vocabulary at build


@dataclass
class DataConfig:
    """Where the tokens come from and how they are packed and split."""

    # "stdlib", a .txt file, a directory of .txt, a .jsonl, a Megatron .bin/.idx prefix, or a Megatron blend:
    # a list [weight, prefix, weight, prefix, ...] (or of prefixes only: weighted by their sizes)
    source: str | list[Any] = STDLIB_SOURCE
    seq_len: int = 128  # tokens per training sequence (windows hold seq_len + 1)
    val_fraction: float = 0.05  # fraction held out for validation, in [0, 1) (windows, or indexed documents)
    split: str | None = None  # .bin/.idx only: Megatron split "train,valid,test" weights; None = val_fraction
    seed: int = 1234  # seed of the order of training samples
    tokenizer: str | None = None  # path to a local Hugging Face tokenizer.json; None = bytes (vocab 257)
    eod_token: str | None = None  # HF only: document separator; None = first of <|endoftext|>, </s>, <eos>
    jsonl_key: str = "text"  # JSONL field holding the document text
    max_bytes: int | None = None  # text sources: read at most this much UTF-8 text (warns); None = all
    cache_dir: str | None = None  # built-in corpus, Megatron indices; None = $EP_MEGATRON_CACHE or ~/.cache

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source: must be 'stdlib', a path or a Megatron blend list, got an empty value")
        if self.seq_len <= 0:
            raise ValueError(f"seq_len: must be > 0, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"max_bytes: must be > 0 or None (read everything), got {self.max_bytes}")
        if not self.jsonl_key:
            raise ValueError("jsonl_key: must be a non-empty field name")
        if self.split is not None:
            _split_weights(self.split)


def _split_weights(split: str) -> list[float]:
    """``[train, valid, test]`` weights of a Megatron split string such as ``"98,2,0"`` (missing parts 0)."""
    try:
        weights = [float(part) for part in split.split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or weights[0] <= 0:
        raise ValueError(f"split: must be 1 to 3 comma-separated weights 'train,valid,test' >= 0 with "
                         f"train > 0, e.g. '98,2,0'; got {split!r}")
    return weights + [0.0] * (3 - len(weights))


# ---------------------------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str  # "byte", or the tokenizer file (names the bigram baseline)
    vocab_size: int
    eod_id: int | None  # appended after every text document; None = documents are concatenated

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255 plus the end-of-document id 256."""

    name = "byte"
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
                "tokenizer: reading a tokenizer.json needs 'tokenizers': pip install ep_megatron[hf]"
            ) from err
        self._tok = _Tokenizer.from_file(path)
        self.name = "/".join(Path(path).resolve().parts[-2:])
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


def _cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("EP_MEGATRON_CACHE") or Path.home() / ".cache" / "ep_megatron")


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
    root = _cache_root(cache_dir)
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


# ------------------------------------------------------------------------------------------ text sources


def _iter_jsonl(path: Path, key: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"source: line {line_no} of {path} is not JSON ({exc})") from exc
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
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


def _capped(docs: Iterable[str], max_bytes: int, source: str) -> Iterator[str]:
    """The documents until ``max_bytes`` of UTF-8 are reached; warns when text is left unread."""
    budget = max_bytes
    for text in docs:
        data = text.encode("utf-8")
        if len(data) > budget:
            if budget:
                yield data[:budget].decode("utf-8", errors="ignore")
            warnings.warn(f"data.max_bytes={max_bytes}: {source!r} holds more text; only its first "
                          f"{max_bytes} bytes are used (unset max_bytes to read everything)", stacklevel=2)
            return
        budget -= len(data)
        yield text


def iter_documents(config: DataConfig) -> Iterator[str]:
    """The text documents of a text source in order: all of them, or the first ``max_bytes`` of UTF-8."""
    if isinstance(config.source, (list, tuple)):
        raise ValueError("source: a list is a Megatron blend of .bin/.idx prefixes, not a text source")
    if config.source == STDLIB_SOURCE:
        source = stdlib_corpus_path(config.cache_dir)
    else:
        source = Path(config.source)
        if not source.exists():
            raise ValueError(f"source: no file or directory at {config.source!r}")
    docs = _iter_text_documents(source, config)
    return docs if config.max_bytes is None else _capped(docs, config.max_bytes, str(config.source))


def read_documents(config: DataConfig) -> list[str]:
    """``iter_documents`` as a list."""
    return list(iter_documents(config))


def tokenize_documents(docs: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """``[num_tokens]``: the non-empty documents' tokens, each followed by the tokenizer's EOD id (if any).

    Documents are encoded in batches of about 8 MB of text, so the transient memory beyond the result
    stays bounded.
    """
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    eod = [np.array([tokenizer.eod_id], dtype=dtype)] if tokenizer.eod_id is not None else []
    parts: list[np.ndarray] = []
    batch: list[str] = []
    batch_chars = 0

    def flush() -> None:
        parts.extend(p for ids in tokenizer.encode(batch) for p in (ids.astype(dtype), *eod))
        batch.clear()

    for text in docs:
        if not text:
            continue
        batch.append(text)
        batch_chars += len(text)
        if batch_chars >= _ENCODE_BATCH_BYTES:
            flush()
            batch_chars = 0
    flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


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


@dataclass(frozen=True)
class BigramBaseline:
    """The loss of the best previous-token-only model on (a sample of) the training split."""

    nats: float  # conditional entropy H(next | previous), nats per token
    label: str  # e.g. "byte-bigram conditional entropy", names the tokenizer and any sampling
    tokens: int  # target tokens counted
    sampled: bool  # True when a sample of the training split was counted, not all of it


def _bigram_label(tokenizer_name: str, tokens: int, sampled: bool) -> str:
    what = "byte-bigram" if tokenizer_name == "byte" else f"token-bigram ({tokenizer_name})"
    where = f" on a {tokens / 1e6:.3g} M-token sample of the training split" if sampled else ""
    return f"{what} conditional entropy{where}"


# ------------------------------------------------------------------------------------------------ batches


class TokenBatches(ABC):
    """Training and validation batches ``(inputs, targets) [batch, seq_len]`` int64, sharded over DP ranks.

    Subclasses define the run's sample order (``train_samples``) and the validation samples; the sharding,
    the argument checks and the bigram baseline are shared.
    """

    vocab_size: int
    seq_len: int
    tokenizer_name: str
    _val_field: str  # the config field that sizes the validation split (named in errors)

    @property
    @abstractmethod
    def num_train_samples(self) -> int:
        """Distinct training samples (one pass over the training split)."""

    @property
    @abstractmethod
    def num_val_samples(self) -> int:
        """Validation samples."""

    @abstractmethod
    def train_samples(self, sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets) [n, seq_len]`` of samples ``sample_ids [n]`` (>= 0) of the run's order."""

    @abstractmethod
    def val_samples(self, sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets) [n, seq_len]`` of validation samples ``sample_ids [n]`` in
        ``[0, num_val_samples)``."""

    @abstractmethod
    def _baseline_samples(self, max_tokens: int) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], bool]:
        """Batches of training samples holding at most ``max_tokens`` targets, and whether that is a sample
        (False: all of the training split)."""

    def train_batch(
        self, step: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs [batch, seq], targets [batch, seq])``: rank ``dp_rank``'s micro-batch at ``step``.

        Ranks read disjoint samples; depends only on (seed, step, dp_rank, dp_size, batch_size).
        """
        _check_shard(batch_size, dp_rank, dp_size)
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        return self.train_samples((step * dp_size + dp_rank) * batch_size + np.arange(batch_size))

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
        """This rank's validation samples in order, ``(inputs, targets) [<=batch, seq]``.

        Rank ``r`` takes samples ``r, r + dp_size, ...``; the last ``num_val_samples mod dp_size`` are
        dropped so every rank yields the same number of batches (safe for collectives).
        """
        _check_shard(batch_size, dp_rank, dp_size)
        per_rank = self.num_val_samples // dp_size
        if per_rank == 0:
            raise ValueError(
                f"{self._val_field}: {self.num_val_samples} validation sample(s) for dp_size={dp_size}; "
                f"raise {self._val_field} or use a larger corpus"
            )
        shard = np.arange(dp_rank, per_rank * dp_size, dp_size)
        for start in range(0, per_rank, batch_size):
            yield self.val_samples(shard[start : start + batch_size])

    def bigram_baseline(self, max_tokens: int = BIGRAM_SAMPLE_TOKENS) -> BigramBaseline:
        """``bigram_conditional_entropy`` of the (input, target) pairs of the training split, or of a
        deterministic sample of at most ``max_tokens`` targets when the split is larger."""
        batches, sampled = self._baseline_samples(max_tokens)
        codes, counts, tokens = [], [], 0
        for inputs, targets in batches:
            chunk_codes, chunk_counts = _pair_counts(inputs.numpy(), targets.numpy(), self.vocab_size)
            codes.append(chunk_codes)
            counts.append(chunk_counts)
            tokens += targets.numel()
        nats = _conditional_entropy(np.concatenate(codes), np.concatenate(counts), self.vocab_size)
        return BigramBaseline(nats, _bigram_label(self.tokenizer_name, tokens, sampled), tokens, sampled)


def _check_shard(batch_size: int, dp_rank: int, dp_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be > 0, got {batch_size}")
    if dp_size <= 0:
        raise ValueError(f"dp_size: must be > 0, got {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank: must be in [0, {dp_size}), got {dp_rank}")


def _chunks(ids: np.ndarray, read: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]],
            chunk: int = 4096) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(ids), chunk):
        yield read(ids[start : start + chunk])


class PackedTokens(TokenBatches):
    """A token stream packed into ``[seq_len + 1]`` windows, split into train/val (text sources).

    ``tokens [num_tokens]`` may be a memory map; batches are gathered on demand. Sample ``g`` of the run
    is training window ``perm[epoch][g mod n]`` with ``epoch = g // n`` (a seeded permutation per epoch).
    """

    _val_field = "val_fraction"

    def __init__(self, tokens: np.ndarray, vocab_size: int, config: DataConfig,
                 tokenizer_name: str = "byte") -> None:
        num_windows = (len(tokens) - 1) // config.seq_len
        if num_windows < 2:
            raise ValueError(
                f"seq_len: {config.seq_len} leaves {num_windows} window(s) of {len(tokens)} tokens; need >= 2"
            )
        self.tokens = tokens
        self.vocab_size = vocab_size
        self.seq_len = config.seq_len
        self.seed = config.seed
        self.tokenizer_name = tokenizer_name
        index = np.arange(num_windows)
        is_val = np.floor((index + 1) * config.val_fraction) > np.floor(index * config.val_fraction)
        self.train_windows = np.flatnonzero(~is_val)
        self.val_windows = np.flatnonzero(is_val)
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def num_train_samples(self) -> int:
        return len(self.train_windows)

    @property
    def num_val_samples(self) -> int:
        return len(self.val_windows)

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

    def train_samples(self, sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        epochs, positions = np.divmod(sample_ids, len(self.train_windows))
        ids = np.array([self._epoch_order(int(e))[p] for e, p in zip(epochs, positions)])
        return self._windows(ids)

    def val_samples(self, sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self.val_windows[sample_ids])

    def _baseline_samples(self, max_tokens: int) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], bool]:
        n, k = len(self.train_windows), max(1, max_tokens // self.seq_len)
        if n <= k:
            return _chunks(self.train_windows, self._windows), False
        spread = self.train_windows[(np.arange(k) * n) // k]  # evenly over the stream: every part counted
        return _chunks(spread, self._windows), True


class IndexedSamples(TokenBatches):
    """Samples of Megatron-Core datasets (``GPTDataset``, or a ``BlendedDataset`` of them) over ``.bin/.idx``.

    Sample ``g`` of the run is ``train[g mod len(train)]``: Megatron's own order (documents shuffled per
    epoch, samples shuffled, blended by weight), built for the run's sample count and cached.
    """

    _val_field = "split"

    def __init__(self, train: Any, valid: Any | None, vocab_size: int, seq_len: int,
                 tokenizer_name: str) -> None:
        if train is None or len(train) == 0:
            raise ValueError("split: the training split of the indexed dataset holds no samples")
        self.train = train
        self.valid = valid
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.tokenizer_name = tokenizer_name

    @property
    def num_train_samples(self) -> int:
        return len(self.train)

    @property
    def num_val_samples(self) -> int:
        return 0 if self.valid is None else len(self.valid)

    @staticmethod
    def _stack(dataset: Any, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [dataset[int(i)] for i in ids]
        return (torch.stack([s["tokens"] for s in samples]), torch.stack([s["labels"] for s in samples]))

    def train_samples(self, sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._stack(self.train, sample_ids % len(self.train))

    def val_samples(self, sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._stack(self.valid, sample_ids)

    def _baseline_samples(self, max_tokens: int) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], bool]:
        n, k = len(self.train), max(1, max_tokens // self.seq_len)
        # Megatron's order is already shuffled: its first k samples are a random sample of the split.
        return _chunks(np.arange(min(n, k)), self.train_samples, chunk=256), n > k


# ------------------------------------------------------------------------------- Megatron indexed datasets


def _source_list(source: str | list[Any]) -> list[Any]:
    return list(source) if isinstance(source, (list, tuple)) else [source]


def _indexed_prefix(source: str) -> str | None:
    """The ``.bin/.idx`` prefix that ``source`` names (``prefix``, ``prefix.bin`` or ``prefix.idx``), or
    None when neither file exists; half a pair raises ``ValueError`` naming the missing file."""
    prefix = source.removesuffix(".bin").removesuffix(".idx")
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    if bin_path.is_file() and idx_path.is_file():
        return prefix
    if bin_path.is_file() or idx_path.is_file():
        present, missing = (bin_path, idx_path) if bin_path.is_file() else (idx_path, bin_path)
        raise ValueError(f"source: {present} has no {missing.name} beside it; a Megatron indexed dataset "
                         f"is a .bin/.idx pair")
    return None


def megatron_blend(source: str | list[Any]) -> tuple[list[str], list[float] | None] | None:
    """``(prefixes, weights or None)`` when ``source`` names Megatron indexed data, else None (text).

    ``source`` is one prefix (or its ``.bin`` / ``.idx`` file), or Megatron's ``--data-path`` list:
    ``[weight, prefix, weight, prefix, ...]`` or prefixes only.
    """
    items = _source_list(source)
    if len(items) == 1:
        prefix = _indexed_prefix(str(items[0]))
        return None if prefix is None else ([prefix], None)
    weighted = all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in items[::2])
    if weighted and len(items) % 2 == 0:
        raw_prefixes, weights = items[1::2], [float(w) for w in items[::2]]
        if min(weights) <= 0:
            raise ValueError(f"source: blend weights must be > 0, got {weights}")
    elif any(isinstance(w, (int, float)) for w in items):
        raise ValueError(f"source: a blend is [weight, prefix, weight, prefix, ...] or prefixes only, "
                         f"got {items}")
    else:
        raw_prefixes, weights = items, None
    prefixes = []
    for raw in raw_prefixes:
        prefix = _indexed_prefix(str(raw))
        if prefix is None:
            raise ValueError(f"source: blend member {raw!r} has no .bin/.idx pair")
        prefixes.append(prefix)
    return prefixes, weights


class _MegatronTokenizerView:
    """What Megatron-Core's ``GPTDataset`` reads from a tokenizer: the vocabulary size (token dtype),
    the EOD id, and ``unique_identifiers`` (part of the index cache key). It has no pad id, so Megatron
    pads (never, with full samples) with its own out-of-vocabulary id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod_id
        self.unique_identifiers = {"class": "ep_megatron", "tokenizer": tokenizer.name,
                                   "vocab_size": tokenizer.vocab_size}


@contextlib.contextmanager
def _process_group_for_megatron() -> Iterator[None]:
    """Megatron-Core's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unguarded when it builds a
    cached blend index; a single process without a process group gets a private one-rank gloo group for
    the build (created here, destroyed after)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_indexed(config: DataConfig, tokenizer: Tokenizer,
                  num_samples: tuple[int, int] | None) -> IndexedSamples:
    """Megatron-Core's datasets over ``config.source``: train and valid splits of ``config.split`` (or
    ``val_fraction``), ``num_samples = (train, valid)`` samples each (None: one epoch, only without
    weights). Every rank must call this (Megatron builds on rank 0 first, then the others read the cache).
    """
    prefixes, weights = megatron_blend(config.source)
    if weights is not None and num_samples is None:
        raise ValueError("source: a weighted blend needs num_samples=(train, valid) samples to draw")
    try:
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    except ImportError as err:
        raise ImportError("source: reading .bin/.idx data needs Megatron-Core: pip install "
                          "ep_megatron[megatron] (or install your Megatron-LM checkout)") from err
    split = config.split or f"{1 - config.val_fraction},{config.val_fraction}"
    train_w, valid_w, test_w = _split_weights(split)
    gpt_config = GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_len,
        blend=(prefixes, weights),
        split=",".join(f"{w:.9f}" for w in (train_w, valid_w, test_w)),  # Megatron reads no exponents
        path_to_cache=str(_cache_root(config.cache_dir) / "megatron_indices"),
        tokenizer=_MegatronTokenizerView(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = [None, None, None] if num_samples is None else [num_samples[0], num_samples[1], 0]
    blended = len(prefixes) > 1
    with _process_group_for_megatron() if blended else contextlib.nullcontext():
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, gpt_config).build()
    data = IndexedSamples(train, valid, tokenizer.vocab_size, config.seq_len, tokenizer.name)
    inputs, targets = data.train_samples(np.arange(min(_VOCAB_CHECK_SAMPLES, data.num_train_samples)))
    top = int(max(inputs.max(), targets.max()))
    if top >= tokenizer.vocab_size:
        raise ValueError(f"tokenizer: the indexed dataset holds id {top} >= vocab size "
                         f"{tokenizer.vocab_size}; pass the tokenizer.json it was made with")
    return data


def build_data(config: DataConfig,
               num_samples: tuple[int, int] | None = None) -> tuple[TokenBatches, Tokenizer]:
    """Read, tokenize and pack a text source, or open a Megatron indexed source (used as tokenized).

    ``num_samples = (train, valid)``: how many samples the run draws; sizes Megatron's datasets (a
    weighted blend needs it), unused for text sources. With an indexed source every rank must call this.
    """
    tokenizer = build_tokenizer(config)
    if megatron_blend(config.source) is not None:
        return build_indexed(config, tokenizer, num_samples), tokenizer
    if config.split is not None:
        raise ValueError("split: is for Megatron .bin/.idx sources; text sources are split by val_fraction")
    tokens = tokenize_documents(iter_documents(config), tokenizer)
    if len(tokens) == 0:
        raise ValueError(f"source: {config.source!r} contains no text")
    return PackedTokens(tokens, tokenizer.vocab_size, config, tokenizer.name), tokenizer


__all__ = [
    "BIGRAM_SAMPLE_TOKENS",
    "BYTE_EOD_ID",
    "BigramBaseline",
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "IndexedSamples",
    "PackedTokens",
    "TokenBatches",
    "Tokenizer",
    "bigram_conditional_entropy",
    "build_data",
    "build_indexed",
    "build_tokenizer",
    "iter_documents",
    "megatron_blend",
    "read_documents",
    "stdlib_corpus_path",
    "tokenize_documents",
]
