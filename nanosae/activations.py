"""Activation collection into a sharded, checksummed cache, and shuffled streams of activations for training.

A cache folder holds `shard_00000.safetensors`, … (tensors `activations` (n, d_in) in the cache dtype, `token_ids`
and `positions` (n,) int32: the token each row was read at and its position in its context) and `manifest.json`
(model, fingerprint, site, dtype, context size, data source, and per shard its rows, tokens, bytes and sha256).

Collection reads the token rows of `data.token_rows` in a fixed order, in forward batches of `batch_size` rows;
shard g holds rows [g*S, (g+1)*S) for a fixed S (a multiple of the batch size), BOS positions dropped, and the
last shard is cut so the cache holds exactly `tokens` rows. Because shards are a pure function of the settings,
a killed run resumes by skipping the shards it finished (checked against their checksums) and produces the
same files as an uninterrupted run, and under torchrun rank r computes the shards g with g % world == r.

A stream (`cache_stream`, `model_stream`) is an endless sequence of shuffled blocks, each at most
`buffer_tokens` rows held in RAM; global batches are consecutive windows of `batch_size` rows of that sequence
and rank r gets rows [r*b, (r+1)*b) of each (b = batch_size // world_size). The position (block, offset) is the
whole state, so a stream rebuilt from `state()` continues bitwise where the old one stopped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from .data import token_rows
from .distributed import dist_info
from .errors import NanosaeError
from .fileio import atomic_write, atomic_write_json, remove_leftovers, sha256_file
from .gpt import GPT
from .hooks import canonical_site, run_with_cache, saelens_hook_name, site_width
from .tokenizer import Tokenizer

FORMAT = "nanosae-activations"
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# settings that define the contents of a cache; a resume must match them all
IDENTITY = (
    "model_name",
    "model_fingerprint",
    "model_dtype",
    "site",
    "d_in",
    "dtype",
    "context_size",
    "dataset",
    "split",
    "keep_bos",
    "tokens",
    "batch_size",
    "shard_rows",
)


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        name = next((k for k, v in DTYPES.items() if v == dtype), None)
    else:
        name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise NanosaeError(f"unsupported activation dtype {dtype!r}; use fp32, bf16 or fp16")
    return name


def model_identity(model: GPT) -> tuple[str, str]:
    """(name, fingerprint) of a model: from `model.info` after load_model, else a hash of its weights."""
    info = getattr(model, "info", None)
    if info is not None:
        return info.name, info.fingerprint
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return "unnamed", h.hexdigest()[:16]


def _site_acts(model: GPT, ids: torch.Tensor, site: str) -> torch.Tensor:
    """(B*T, d) activations at `site`, the forward stopped right after the block that holds it."""
    _, acts = run_with_cache(model, ids.to(model.device), [site], stop_early=True)
    return acts[site].reshape(-1, acts[site].size(-1))


def _row_batches(rows: Iterator[list[int]], n: int) -> Iterator[torch.Tensor]:
    """LongTensor batches of n rows; the last one may be shorter (collection keeps every row it was given)."""
    while batch := list(itertools.islice(rows, n)):
        yield torch.tensor(batch, dtype=torch.long)


def _prefetch(items: Iterator, depth: int) -> Iterator:
    """`items`, produced up to `depth` ahead on a background thread: tokenizing overlaps the forward (tiktoken
    releases the GIL). Errors of the producer are raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end, stop = object(), threading.Event()

    def produce() -> None:
        try:
            for x in items:
                q.put(x)
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:
            q.put(e)

    threading.Thread(target=produce, daemon=True).start()
    try:
        while (x := q.get()) is not end:
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:  # the consumer stopped early: let a producer blocked on a full queue see `stop` and exit
        stop.set()
        while not q.empty():
            q.get_nowait()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# the cache on disk


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NanosaeError(f"{path}: unreadable ({e}); delete the folder and collect again") from None
    if not isinstance(obj, dict):
        raise NanosaeError(f"{path}: not a JSON object; delete the folder and collect again")
    return obj


def _check_shard(cache_dir: Path, entry: dict, full: bool = True) -> None:
    """Raise a one-line NanosaeError naming the shard when it is missing, truncated or (full) fails its sha256."""
    path = cache_dir / entry["file"]
    if not path.is_file():
        raise NanosaeError(f"{path}: shard missing; re-run the same collect command to collect it again")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise NanosaeError(
            f"{path}: shard is truncated or altered ({size} of {entry['bytes']} bytes); "
            "delete it and re-run the same collect command to collect it again"
        )
    if full and sha256_file(path) != entry["sha256"]:
        raise NanosaeError(
            f"{path}: shard is corrupt (sha256 differs from the manifest); "
            "delete it and re-run the same collect command to collect it again"
        )


def load_manifest(cache_dir: str | os.PathLike) -> dict:
    """The manifest of a complete cache, after checking that every shard is present with the recorded size."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not path.is_file():
        what = "does not exist" if not cache_dir.exists() else f"has no {MANIFEST}"
        raise NanosaeError(f"{cache_dir}: {what}; pass a folder written by `nanosae collect`")
    m = _read_json(path)
    if m.get("format") != FORMAT:
        raise NanosaeError(f"{path}: not a nanosae activation manifest (format {m.get('format')!r})")
    if not m.get("complete"):
        raise NanosaeError(
            f"{cache_dir}: collection is incomplete ({len(m.get('shards', []))} shards done); "
            "re-run the same collect command to finish it"
        )
    for entry in m["shards"]:
        _check_shard(cache_dir, entry, full=False)
    return m


def iter_cache(cache_dir: str | os.PathLike) -> Iterator[dict[str, torch.Tensor]]:
    """Each shard in order as {activations, token_ids, positions}, checksum verified."""
    cache_dir = Path(cache_dir)
    for entry in load_manifest(cache_dir)["shards"]:
        _check_shard(cache_dir, entry)
        yield safetensors.torch.load_file(cache_dir / entry["file"])


class _ShardWriter:
    """Serialises, checksums and writes shards on a background thread so the forward never waits on disk; after
    each shard it records the entry in progress-r<rank>.json (atomic), which is what a resume trusts."""

    def __init__(self, out: Path, rank: int):
        self.out = out
        self.progress = out / f"progress-r{rank}.json"
        self.entries: list[dict] = []
        self.error: BaseException | None = None
        self.q: queue.Queue = queue.Queue(maxsize=2)  # bounds the shards waiting in RAM
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, index: int, rows: tuple[int, int], tensors: dict[str, torch.Tensor]) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((index, rows, tensors))

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self._write(*item)
                except BaseException as e:
                    self.error = e

    def _write(self, index: int, rows: tuple[int, int], tensors: dict[str, torch.Tensor]) -> None:
        data = safetensors.torch.save(tensors, {"format": "pt"})  # one key: more would be written in random order
        name = shard_name(index)
        atomic_write(self.out / name, lambda f: f.write(data))
        entry = {
            "index": index,
            "file": name,
            "rows": list(rows),
            "tokens": len(tensors["token_ids"]),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        self.entries.append(entry)
        atomic_write_json(self.progress, {"shards": self.entries})

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _consolidate(out: Path, header: dict) -> dict:
    """Rank 0, before anyone writes: check an existing cache matches this run, fold progress files into the
    manifest, verify the finished shards and drop those whose file is gone (they get collected again)."""
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / MANIFEST
    progress = sorted(out.glob("progress-r*.json"))
    if mpath.is_file():
        m = _read_json(mpath)
        if m.get("format") != FORMAT:
            raise NanosaeError(f"{mpath}: not a nanosae activation manifest; pick another --out")
        started = m.get("shards") or any(_read_json(p).get("shards") for p in progress)
        for k in IDENTITY if started else ():  # a cache without a single shard yet (a failed start) is reused
            if m.get(k) != header[k]:
                raise NanosaeError(
                    f"{out}: holds activations with {k}={m.get(k)!r}, but this run has {k}={header[k]!r}; "
                    "use another --out (or delete the folder) so caches never mix"
                )
        done = {e["index"]: e for e in m.get("shards", [])}
    else:
        if any(not p.name.startswith(".") for p in out.iterdir()):
            raise NanosaeError(f"{out}: exists, is not empty and holds no {MANIFEST}; pick an empty or new --out")
        done, m = {}, {}
    for p in progress:
        done.update({e["index"]: e for e in _read_json(p).get("shards", [])})
    remove_leftovers(out)  # temp files of shard writes killed mid-way
    done = {i: e for i, e in done.items() if (out / e["file"]).is_file()}
    for e in done.values():
        _check_shard(out, e)
    complete = bool(m.get("complete")) and len(done) == len(m.get("shards", []))
    totals = {k: m[k] for k in ("total_tokens", "num_shards")} if complete else {}
    manifest = {**header, "complete": complete, **totals, "shards": [done[i] for i in sorted(done)]}
    atomic_write_json(mpath, manifest)
    for p in progress:
        p.unlink()
    return manifest


def collect(
    model: GPT,
    tokenizer: Tokenizer,
    out: str | os.PathLike,
    site: str,
    tokens: int,
    *,
    source: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    seq_len: int | None = None,
    batch_size: int = 32,
    shard_tokens: int = 1 << 16,
    keep_bos: bool = False,
    split: str | None = "train",
    progress: bool = True,
) -> dict:
    """Collect `tokens` activations at `site` into the cache folder `out` (resuming a previous run of the same
    settings) and return its manifest. Under torch.distributed every rank calls this with the same arguments."""
    site = canonical_site(site, model)
    if tokens < 1 or batch_size < 1 or shard_tokens < 1:
        raise NanosaeError("tokens, batch_size and shard_tokens must be positive")
    seq_len = seq_len or model.config.sequence_len
    if not 2 <= seq_len <= model.cos.size(1):
        raise NanosaeError(f"seq_len {seq_len} is out of range; this model takes 2..{model.cos.size(1)}")
    rank, world = dist_info()
    out = Path(out)
    shard_rows = batch_size * max(1, round(shard_tokens / (batch_size * seq_len)))
    header = _header(model, site, tokens, source, dtype, seq_len, batch_size, shard_rows, keep_bos, split)
    if rank == 0:
        manifest = _consolidate(out, header)
    _barrier(world)
    if rank != 0:
        manifest = _read_json(out / MANIFEST)
    if manifest["complete"]:
        if progress and rank == 0:
            print(f"{out}: already complete ({manifest['total_tokens']:,} tokens in {manifest['num_shards']} shards)")
        return manifest
    done = {e["index"] for e in manifest["shards"]}

    t0 = time.perf_counter()
    seen, n_shards, computed, t_fwd = _collect_shards(
        model, tokenizer, out, header, source, done, rank, world, progress
    )
    elapsed = time.perf_counter() - t0
    _barrier(world)
    if rank == 0:
        manifest = _finish_manifest(out, header, manifest, seen, n_shards)
        if progress:
            size = sum(e["bytes"] for e in manifest["shards"])
            short = f"; the source ran out before {tokens:,}" if seen < tokens else ""
            print(
                f"collected {seen:,} tokens{short} of {site} (d_in {header['d_in']}, {header['dtype']}) from "
                f"{header['model_name']} into {out}: {n_shards} shard{'s' * (n_shards != 1)}, {size / 1e6:.1f} MB"
                + (f", {len(done)} kept from an earlier run" if done else "")
                + (
                    f"; {computed / elapsed:,.0f} tok/s on rank 0, {t_fwd / elapsed:.0%} of the time in the forward"
                    if computed
                    else ""
                )
            )
    _barrier(world)
    if rank != 0:
        manifest = _read_json(out / MANIFEST)
    return manifest


def _header(
    model: GPT,
    site: str,
    tokens: int,
    source,
    dtype: str | torch.dtype,
    seq_len: int,
    batch_size: int,
    shard_rows: int,
    keep_bos: bool,
    split: str | None,
) -> dict:
    """The manifest's description of a cache: what it holds (IDENTITY) and where it came from."""
    name, fingerprint = model_identity(model)
    return {
        "format": FORMAT,
        "version": 1,
        "model_name": name,
        "model_fingerprint": fingerprint,
        "model_path": getattr(getattr(model, "info", None), "path", None),
        "model_dtype": _dtype_name(model.compute_dtype),
        "site": site,
        "hook_name": saelens_hook_name(site),
        "d_in": site_width(model, site),
        "dtype": _dtype_name(dtype),
        "context_size": seq_len,
        "dataset": "builtin" if source is None else str(source),
        "split": split,
        "keep_bos": keep_bos,
        "tokens": tokens,
        "batch_size": batch_size,
        "shard_rows": shard_rows,
    }


def _collect_shards(
    model: GPT,
    tokenizer: Tokenizer,
    out: Path,
    header: dict,
    source,
    done: set[int],
    rank: int,
    world: int,
    progress: bool,
) -> tuple[int, int, int, float]:
    """Read the token rows in order and write this rank's shards (g % world == rank) that are not `done`: returns
    the tokens kept by all ranks, the shards they fill, and this rank's computed tokens and forward seconds."""
    site, tokens, seq_len, batch_size = header["site"], header["tokens"], header["context_size"], header["batch_size"]
    torch_dtype = DTYPES[header["dtype"]]
    writer = _ShardWriter(out, rank)
    bos = tokenizer.bos_token_id
    rows = token_rows(tokenizer, source, seq_len, header["split"], repeat=False)
    batches = _prefetch(_row_batches(rows, batch_size), depth=4)
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc=f"collect {site}", disable=not progress or rank > 0)
    seen = 0  # tokens kept so far, all ranks together
    shard = 0
    t_fwd, computed = 0.0, 0
    try:
        with torch.no_grad():
            while seen < tokens:
                group = list(itertools.islice(batches, header["shard_rows"] // batch_size))
                if not group:
                    break  # the source ran out
                mine = shard % world == rank and shard not in done
                parts: dict[str, list[torch.Tensor]] = {"activations": [], "token_ids": [], "positions": []}
                n_rows = 0
                for ids in group:
                    keep = torch.ones_like(ids, dtype=torch.bool) if header["keep_bos"] else ids != bos
                    take = min(int(keep.sum()), tokens - seen)
                    n_rows += len(ids)
                    if mine:
                        tf = time.perf_counter()
                        acts = _site_acts(model, ids, site)
                        idx = keep.flatten().nonzero().squeeze(1)[:take]
                        parts["activations"].append(acts[idx.to(acts.device)].to(torch_dtype).cpu())
                        t_fwd += time.perf_counter() - tf  # .cpu() waits for the device, so this is all compute
                        parts["token_ids"].append(ids.flatten()[idx].int())
                        parts["positions"].append((idx % seq_len).int())
                        computed += take
                    seen += take
                    bar.update(take)
                    if seen >= tokens:
                        break
                if mine:
                    start = shard * header["shard_rows"]
                    writer.put(shard, (start, start + n_rows), {k: torch.cat(v) for k, v in parts.items()})
                shard += 1
    finally:
        bar.close()
        batches.close()
        writer.close()  # finished shards reach the disk even on Ctrl-C, so a re-run resumes after them
    return seen, shard, computed, t_fwd


def _finish_manifest(out: Path, header: dict, manifest: dict, seen: int, n_shards: int) -> dict:
    """Rank 0, after every rank's shards are written: the complete manifest, from the shards of the earlier runs
    and each rank's progress file (then deleted)."""
    entries = {e["index"]: e for e in manifest["shards"]}
    for p in sorted(out.glob("progress-r*.json")):
        entries.update({e["index"]: e for e in _read_json(p)["shards"]})
    missing = sorted(set(range(n_shards)) - set(entries))
    if missing:
        raise NanosaeError(f"{out}: shards {missing[:5]} were not written; re-run the same collect command")
    manifest = {
        **header,
        "complete": True,
        "total_tokens": seen,
        "num_shards": n_shards,
        "shards": [entries[i] for i in range(n_shards)],
    }
    atomic_write_json(out / MANIFEST, manifest)
    for p in out.glob("progress-r*.json"):
        p.unlink()
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# streams


def _generator(*parts) -> torch.Generator:
    """A generator seeded from a tuple, so each (seed, epoch, block) gets its own independent permutation."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class ActivationStream:
    """An endless iterator of float32 (batch_size // world_size, d_in) tensors: rank r's share of each global
    batch. `state()` is a small JSON-able dict; building the same stream with `state=` continues exactly."""

    d_in: int
    site: str
    model_name: str
    context_size: int
    dataset: str

    def __init__(self, batch_size: int, rank: int, world_size: int, identity: dict, state: dict | None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise NanosaeError(f"bad stream split: batch_size {batch_size}, rank {rank}, world_size {world_size}")
        if batch_size % world_size:
            raise NanosaeError(f"batch_size {batch_size} must divide by world_size {world_size}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self._identity = {**identity, "batch_size": batch_size}
        self._bid: tuple[int, ...] = self._first()
        self._off = 0
        self._block: torch.Tensor | None = None
        self._perm: torch.Tensor | None = None
        self.peak_buffered_tokens = 0  # the most rows held at once (bounded by buffer_tokens)
        if state is not None:
            if not isinstance(state, dict) or any(state.get(k) != v for k, v in self._identity.items()):
                diff = [k for k, v in self._identity.items() if not isinstance(state, dict) or state.get(k) != v]
                raise NanosaeError(
                    f"stream state does not belong to this stream (differs in {diff}); pass the same "
                    "cache/model, seed, batch size and buffer as the run that saved it"
                )
            self._bid, self._off = tuple(state["block"]), int(state["offset"])

    def _first(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _next(self, bid: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def _load(self, bid: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict:
        return {**self._identity, "block": list(self._bid), "offset": self._off}

    def _consume(self, n: int, keep: bool) -> list[torch.Tensor]:
        parts = []
        while n > 0:
            if self._block is None:
                self._block = self._load(self._bid)
                gen = _generator("rows", self._identity["seed"], *self._bid)
                self._perm = torch.randperm(len(self._block), generator=gen).to(self._block.device)
                self.peak_buffered_tokens = max(self.peak_buffered_tokens, len(self._block))
            t = min(n, len(self._block) - self._off)
            if keep:
                parts.append(self._block[self._perm[self._off : self._off + t]])
            self._off += t
            n -= t
            if self._off == len(self._block):  # leave the state at the next block so a resume needn't load this one
                self._bid, self._off, self._block, self._perm = self._next(self._bid), 0, None, None
        return parts

    def __iter__(self) -> ActivationStream:
        return self

    def __next__(self) -> torch.Tensor:
        b = self.batch_size // self.world_size
        self._consume(self.rank * b, keep=False)
        parts = self._consume(b, keep=True)
        self._consume((self.world_size - 1 - self.rank) * b, keep=False)
        return (torch.cat(parts) if len(parts) > 1 else parts[0]).float()


class CacheStream(ActivationStream):
    """Shuffled batches from a cache folder. Each shard is cut into pieces of at most buffer_tokens // 8 rows;
    every epoch permutes the pieces and groups them into blocks of at most buffer_tokens rows, so a block mixes
    distant parts of the data; rows are permuted within a block."""

    def __init__(self, cache_dir, batch_size: int, seed: int, rank: int, world_size: int, state, buffer_tokens: int):
        self.cache_dir = Path(cache_dir)
        self.manifest = m = load_manifest(self.cache_dir)
        if buffer_tokens < 1:
            raise NanosaeError("buffer_tokens must be positive")
        self.d_in, self.site, self.model_name = m["d_in"], m["site"], m["model_name"]
        self.context_size, self.dataset = m["context_size"], m["dataset"]
        self.buffer_tokens = buffer_tokens
        piece = max(1, buffer_tokens // 8)
        self._pieces = []
        for i, e in enumerate(m["shards"]):
            k = math.ceil(e["tokens"] / piece)
            bounds = [round(j * e["tokens"] / k) for j in range(k + 1)]
            self._pieces += [(i, a, b) for a, b in zip(bounds, bounds[1:])]
        self._plans: dict[int, list[list[tuple[int, int, int]]]] = {}
        self._verified: set[int] = set()
        cache_id = hashlib.sha256("".join(e["sha256"] for e in m["shards"]).encode()).hexdigest()[:16]
        identity = {"kind": "cache", "cache": cache_id, "seed": seed, "buffer_tokens": buffer_tokens}
        super().__init__(batch_size, rank, world_size, identity, state)

    def _plan(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        if epoch not in self._plans:
            order = torch.randperm(len(self._pieces), generator=_generator("pieces", self._identity["seed"], epoch))
            blocks, size = [[]], 0
            for i in order.tolist():
                p = self._pieces[i]
                if blocks[-1] and size + p[2] - p[1] > self.buffer_tokens:
                    blocks.append([])
                    size = 0
                blocks[-1].append(p)
                size += p[2] - p[1]
            self._plans = {epoch: blocks}  # only the current epoch's plan is kept
        return self._plans[epoch]

    def _first(self) -> tuple[int, ...]:
        return (0, 0)

    def _next(self, bid: tuple[int, ...]) -> tuple[int, ...]:
        epoch, j = bid
        return (epoch, j + 1) if j + 1 < len(self._plan(epoch)) else (epoch + 1, 0)

    def _load(self, bid: tuple[int, ...]) -> torch.Tensor:
        pieces = self._plan(bid[0])[bid[1]]
        shards = self.manifest["shards"]
        block = torch.empty(sum(b - a for _, a, b in pieces), self.d_in, dtype=DTYPES[self.manifest["dtype"]])
        at = 0
        for s, a, b in pieces:
            if s not in self._verified:
                _check_shard(self.cache_dir, shards[s])
                self._verified.add(s)
            with safe_open(self.cache_dir / shards[s]["file"], framework="pt") as f:
                block[at : at + b - a] = f.get_slice("activations")[a:b]
            at += b - a
        return block


def cache_stream(
    cache_dir: str | os.PathLike,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    state: dict | None = None,
    buffer_tokens: int = 1 << 18,
) -> ActivationStream:
    """Endless shuffled float32 batches (on CPU) from a collected cache, looping over epochs; RAM holds at most
    buffer_tokens rows in the cache dtype plus one batch."""
    return CacheStream(cache_dir, batch_size, seed, rank, world_size, state, buffer_tokens)


class ModelStream(ActivationStream):
    """Shuffled batches computed on the fly: fill k forwards token rows [k*R, (k+1)*R) (the data repeats
    forever), drops BOS positions and is permuted as one block. With torch.distributed initialised for this
    rank/world the forward batches of a fill are split across ranks and all-gathered; without it every rank
    computes the whole fill (same result, W times the compute)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        site: str,
        source: str | os.PathLike | None,
        batch_size: int,
        seq_len: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        buffer_tokens: int = 1 << 18,
        forward_rows: int = 8,
        split: str | None = "train",
    ):
        self.model, self.tokenizer, self.source, self.split = model, tokenizer, source, split
        self.site = canonical_site(site, model)
        self.d_in = site_width(model, self.site)
        self.model_name, fingerprint = model_identity(model)
        self.context_size = seq_len = seq_len or model.config.sequence_len
        self.dataset = "builtin" if source is None else str(source)
        if not 2 <= seq_len <= model.cos.size(1):
            raise NanosaeError(f"seq_len {seq_len} is out of range; this model takes 2..{model.cos.size(1)}")
        if buffer_tokens < seq_len:
            raise NanosaeError(f"buffer_tokens {buffer_tokens} must hold at least one row of {seq_len} tokens")
        fill_rows = buffer_tokens // seq_len
        self.forward_rows = min(forward_rows, fill_rows)
        self.fill_rows = fill_rows - fill_rows % self.forward_rows
        self._rows: Iterator[list[int]] | None = None
        self._row_pos = 0
        identity = {
            "kind": "model",
            "model": fingerprint,
            "site": self.site,
            "dataset": self.dataset,
            "split": split,
            "seq_len": seq_len,
            "seed": seed,
            "buffer_tokens": buffer_tokens,
            "forward_rows": self.forward_rows,
        }
        super().__init__(batch_size, rank, world_size, identity, state)

    def _first(self) -> tuple[int, ...]:
        return (0,)

    def _next(self, bid: tuple[int, ...]) -> tuple[int, ...]:
        return (bid[0] + 1,)

    def _fill_tokens(self, k: int) -> torch.Tensor:
        start = k * self.fill_rows
        if self._rows is None or self._row_pos > start:
            rows = token_rows(self.tokenizer, self.source, self.context_size, self.split, repeat=True)
            self._rows = _prefetch(rows, depth=2 * self.fill_rows)
            self._row_pos = 0
        rows = list(itertools.islice(self._rows, start - self._row_pos, start - self._row_pos + self.fill_rows))
        self._row_pos = start + self.fill_rows
        return torch.tensor(rows, dtype=torch.long)

    def _load(self, bid: tuple[int, ...]) -> torch.Tensor:
        ids = self._fill_tokens(bid[0])
        batches = ids.split(self.forward_rows)
        with torch.no_grad():
            if self.world_size > 1 and dist_info() == (self.rank, self.world_size):
                acts = self._gathered(batches)
            else:
                acts = [self._acts(b) for b in batches]
        keep = (ids != self.tokenizer.bos_token_id).flatten().to(self.model.device)
        return torch.cat(acts)[keep]

    def _acts(self, ids: torch.Tensor) -> torch.Tensor:
        return _site_acts(self.model, ids, self.site)

    def _gathered(self, batches: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        # rank r forwards batches r, r+W, …; equal-shape all_gather, padded with zeros where a rank has one less
        W, n = self.world_size, len(batches)
        per = math.ceil(n / W)
        mine = [self._acts(batches[j]) for j in range(self.rank, n, W)]
        shape = (self.forward_rows * self.context_size, self.d_in)
        local = torch.zeros((per, *shape), dtype=self.model.compute_dtype, device=self.model.device)
        for i, a in enumerate(mine):
            local[i] = a
        got = [torch.empty_like(local) for _ in range(W)]
        dist.all_gather(got, local)
        return [got[j % W][j // W] for j in range(n)]


def model_stream(model: GPT, tokenizer: Tokenizer, site: str, source, batch_size: int, **options) -> ActivationStream:
    """Endless shuffled float32 batches (on the model's device) computed straight from the model, BOS excluded;
    no cache needed. A resume re-tokenizes (but does not forward) the rows before its position. Options: those of
    ModelStream (seq_len, seed, rank, world_size, state, buffer_tokens, forward_rows, split)."""
    return ModelStream(model, tokenizer, site, source, batch_size, **options)


class PairedModelStream(ModelStream):
    """A ModelStream over two models that share a tokenizer and a site width: each forward batch of token rows
    runs through model A, then model B, and the rows are [a^A ; a^B] (d_in = 2d), so both see the same tokens and
    memory holds one forward batch of each besides the shuffle buffer. What a crosscoder trains on."""

    def __init__(self, model: GPT, model_b: GPT, tokenizer: Tokenizer, site: str, source, batch_size: int, **options):
        self.model_b = model_b
        super().__init__(model, tokenizer, site, source, batch_size, **options)
        canonical_site(self.site, model_b)
        check_pair(model, model_b, self.site)
        self.d_in *= 2
        name_b, fingerprint_b = model_identity(model_b)
        self.model_names = (self.model_name, name_b)
        self.model_name = f"{self.model_name} vs {name_b}"
        self._identity["model_b"] = fingerprint_b
        if options.get("state") is not None and options["state"].get("model_b") != fingerprint_b:
            raise NanosaeError("stream state does not belong to this pair of models; pass the models the run used")

    def _acts(self, ids: torch.Tensor) -> torch.Tensor:
        a = _site_acts(self.model, ids, self.site)
        return torch.cat([a, _site_acts(self.model_b, ids, self.site).to(a)], dim=1)


def check_pair(model_a: GPT, model_b: GPT, site: str) -> None:
    """A one-line error unless the two models can be paired token by token at `site` (same width there)."""
    wa, wb = site_width(model_a, site), site_width(model_b, site)
    if wa != wb:
        na, nb = model_identity(model_a)[0], model_identity(model_b)[0]
        raise NanosaeError(
            f"{na} is {wa} wide at {site} but {nb} is {wb}: a crosscoder pairs activations of one width; diff two "
            "models of one architecture (e.g. a base model and its fine-tune)"
        )


def paired_model_stream(
    model_a: GPT, model_b: GPT, tokenizer: Tokenizer, site: str, source, batch_size: int, **options
) -> ActivationStream:
    """Endless shuffled float32 batches [a^A ; a^B] of two models on the same tokens (PairedModelStream); options
    as model_stream's."""
    return PairedModelStream(model_a, model_b, tokenizer, site, source, batch_size, **options)
