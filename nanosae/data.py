"""Text sources -> documents -> BOS-prefixed token rows and batches.

A source is one of: None or "builtin" (the corpus already on every machine with Python: the standard
library's sources and its bundled documentation, no download), a text file, a .jsonl file (a "text" field per
line), a nanochat .parquet shard ("text" column), or a directory of any of these (parquet shards take
nanochat's rule: the last shard is the validation split). Elsewhere every 20th document is validation.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import NanosaeError
from .tokenizer import Tokenizer

VAL_EVERY = 20
TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".json",
    ".html",
    ".csv",
    ".tex",
    ".c",
    ".h",
    ".js",
    ".toml",
    ".yaml",
}


def builtin_files() -> list[Path]:
    """The built-in corpus: stdlib .py sources (tests and site-packages excluded), the license, sorted."""
    std = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for root, dirs, names in os.walk(std):
        dirs[:] = sorted(d for d in dirs if d not in {"site-packages", "test", "tests", "idle_test", "__pycache__"})
        files += [Path(root) / n for n in sorted(names) if n.endswith(".py")]
    lic = std / "LICENSE.txt"
    return files + ([lic] if lic.is_file() else [])


def _builtin_documents() -> Iterator[str]:
    try:  # the pydoc topics: the language reference in English prose
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]
    except ImportError:
        pass
    for f in builtin_files():
        yield f.read_text(encoding="utf-8", errors="replace")


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise NanosaeError(f"{path}:{n}: not valid JSON") from None
            text = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise NanosaeError(f"{path}:{n}: expected a string or an object with a 'text' field")
            yield text


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise NanosaeError(f"{path}: cannot read as parquet ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise NanosaeError(f"{path}: parquet has no 'text' column (columns: {pf.schema_arrow.names})")
    for rg in range(pf.num_row_groups):
        yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path)
    elif path.suffix == ".parquet":
        yield from _parquet_documents(path)
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _every_nth(docs: Iterator[str], split: str | None) -> Iterator[str]:
    for i, d in enumerate(docs):
        if split is None or (split == "val") == (i % VAL_EVERY == VAL_EVERY - 1):
            yield d


def iter_documents(source: str | os.PathLike | None = None, split: str | None = "train") -> Iterator[str]:
    """Documents of a source, in a fixed order; split is "train", "val" or None (everything)."""
    if split not in ("train", "val", None):
        raise NanosaeError(f"unknown split {split!r}; use train or val")
    if source is None or str(source) == "builtin":
        yield from _every_nth(_builtin_documents(), split)
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise NanosaeError(f"{path}: data source not found; pass a text/.jsonl/.parquet file, a directory or 'builtin'")
    if path.is_file():
        yield from _every_nth(_file_documents(path), split)
        return
    shards = sorted(path.glob("*.parquet"))
    if shards:  # nanochat's layout: all shards but the last are train, the last is val
        if len(shards) == 1 or split is None:
            yield from _every_nth(
                (d for s in shards for d in _parquet_documents(s)), split if len(shards) == 1 else None
            )
            return
        for s in shards[:-1] if split == "train" else shards[-1:]:
            yield from _parquet_documents(s)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl"))
    if not files:
        raise NanosaeError(f"{path}: no .parquet, .jsonl or text files inside")
    yield from _every_nth((d for f in files for d in _file_documents(f)), split)


def token_rows(
    tokenizer: Tokenizer,
    source: str | os.PathLike | None,
    seq_len: int,
    split: str | None = "train",
    repeat: bool = False,
    docs_per_encode: int = 64,
) -> Iterator[list[int]]:
    """Rows of exactly seq_len tokens, each starting with <|bos|>. A document longer than a row continues in
    the next row (after a fresh BOS); short documents are packed together, each after its own BOS."""
    if seq_len < 2:
        raise NanosaeError("seq_len must be at least 2")
    bos = tokenizer.bos_token_id
    row: list[int] = []
    while True:
        produced = False
        docs = iter_documents(source, split)
        while chunk := [d for _, d in zip(range(docs_per_encode), docs)]:
            for ids in tokenizer.encode(chunk, prepend=bos):
                while ids:
                    if not row and ids[0] != bos:  # a continuation: every row starts with BOS
                        ids = [bos] + ids
                    take = seq_len - len(row)
                    row, ids = row + ids[:take], ids[take:]
                    if len(row) == seq_len:
                        produced = True
                        yield row
                        row = []
        if not repeat:
            return
        if not produced:
            raise NanosaeError(f"source {source or 'builtin'} ({split}) holds too little text for one row")


def token_batches(
    tokenizer: Tokenizer,
    source: str | os.PathLike | None,
    batch_size: int,
    seq_len: int,
    split: str | None = "train",
    repeat: bool = False,
) -> Iterator[torch.Tensor]:
    """LongTensor batches (batch_size, seq_len) of token_rows; the last partial batch is dropped."""
    batch: list[list[int]] = []
    for row in token_rows(tokenizer, source, seq_len, split, repeat):
        batch.append(row)
        if len(batch) == batch_size:
            yield torch.tensor(batch, dtype=torch.long)
            batch = []
