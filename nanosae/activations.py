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
from .hooks import canonical_site, check_target, run_with_cache, saelens_hook_name, site_width
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


def _site_acts(model: GPT, ids: torch.Tensor, sites: list[str]) -> torch.Tensor:
    """(B*T, sum of the widths) activations at `sites`, side by side in their order, from one forward stopped right
    after the block that holds the deepest."""
    _, acts = run_with_cache(model, ids.to(model.device), sites, stop_early=True)
    flat = [acts[s].reshape(-1, acts[s].size(-1)) for s in sites]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


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
    **options,
) -> dict:
    """Collect `tokens` activations at `site` into the cache folder `out` (resuming a previous run of the same
    settings) and return its manifest. Under torch.distributed every rank calls this with the same arguments.
    Options: source, dtype, seq_len, batch_size (rows per forward), shard_tokens, keep_bos, split, progress."""
    site = canonical_site(site, model)
    return _collect(model, tokenizer, {site: Path(out)}, tokens, **options)[site]


def collect_sites(
    model: GPT, tokenizer: Tokenizer, out: str | os.PathLike, sites: list[str], tokens: int, **options
) -> dict[str, dict]:
    """collect() at several sites in one pass: each forward runs once, up to the deepest site, and every site gets
    its own cache folder out/<site> (each resumable on its own). Returns {site: manifest}."""
    names = list(dict.fromkeys(canonical_site(s, model) for s in sites))
    return _collect(model, tokenizer, {s: Path(out) / s for s in names}, tokens, **options)


def _collect(
    model: GPT,
    tokenizer: Tokenizer,
    outs: dict[str, Path],
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
) -> dict[str, dict]:
    if tokens < 1 or batch_size < 1 or shard_tokens < 1:
        raise NanosaeError("tokens, batch_size and shard_tokens must be positive")
    seq_len = seq_len or model.config.sequence_len
    if not 2 <= seq_len <= model.cos.size(1):
        raise NanosaeError(f"seq_len {seq_len} is out of range; this model takes 2..{model.cos.size(1)}")
    rank, world = dist_info()
    shard_rows = batch_size * max(1, round(shard_tokens / (batch_size * seq_len)))
    headers = {
        s: _header(model, s, tokens, source, dtype, seq_len, batch_size, shard_rows, keep_bos, split) for s in outs
    }
    manifests = {s: _consolidate(out, headers[s]) for s, out in outs.items()} if rank == 0 else {}
    _barrier(world)
    if rank != 0:
        manifests = {s: _read_json(out / MANIFEST) for s, out in outs.items()}
    todo = {s: out for s, out in outs.items() if not manifests[s]["complete"]}
    for s, out in outs.items():
        if s not in todo and progress and rank == 0:
            m = manifests[s]
            print(f"{out}: already complete ({m['total_tokens']:,} tokens in {m['num_shards']} shards)")
    if not todo:
        return manifests
    done = {s: {e["index"] for e in manifests[s]["shards"]} for s in todo}

    t0 = time.perf_counter()
    header = headers[next(iter(todo))]  # what the sites share: tokens, rows, dtype
    seen, n_shards, computed, t_fwd = _collect_shards(
        model, tokenizer, todo, header, source, done, rank, world, progress
    )
    elapsed = time.perf_counter() - t0
    _barrier(world)
    if rank == 0:
        for s, out in todo.items():
            manifests[s] = m = _finish_manifest(out, headers[s], manifests[s], seen, n_shards)
            if progress:
                size = sum(e["bytes"] for e in m["shards"])
                short = f"; the source ran out before {tokens:,}" if seen < tokens else ""
                print(
                    f"collected {seen:,} tokens{short} of {s} (d_in {m['d_in']}, {m['dtype']}) from "
                    f"{m['model_name']} into {out}: {n_shards} shard{'s' * (n_shards != 1)}, {size / 1e6:.1f} MB"
                    + (f", {len(done[s])} kept from an earlier run" if done[s] else "")
                )
        if progress and computed:
            print(f"{computed / elapsed:,.0f} tok/s on rank 0, {t_fwd / elapsed:.0%} of the time in the forward")
    _barrier(world)
    if rank != 0:
        manifests = {s: _read_json(out / MANIFEST) for s, out in outs.items()}
    return manifests


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
    outs: dict[str, Path],
    header: dict,
    source,
    done: dict[str, set[int]],
    rank: int,
    world: int,
    progress: bool,
) -> tuple[int, int, int, float]:
    """Read the token rows in order and write this rank's shards (g % world == rank) that some site has not `done`,
    each forward reaching only the sites that need it: returns the tokens kept by all ranks, the shards they fill,
    and this rank's computed tokens and forward seconds."""
    tokens, seq_len, batch_size = header["tokens"], header["context_size"], header["batch_size"]
    torch_dtype = DTYPES[header["dtype"]]
    widths = {s: site_width(model, s) for s in outs}
    writers = {s: _ShardWriter(out, rank) for s, out in outs.items()}
    bos = tokenizer.bos_token_id
    rows = token_rows(tokenizer, source, seq_len, header["split"], repeat=False)
    batches = _prefetch(_row_batches(rows, batch_size), depth=4)
    what = next(iter(outs)) if len(outs) == 1 else f"{len(outs)} sites"
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc=f"collect {what}", disable=not progress or rank > 0)
    seen = 0  # tokens kept so far, all ranks together
    shard = 0
    t_fwd, computed = 0.0, 0
    try:
        with torch.no_grad():
            while seen < tokens:
                group = list(itertools.islice(batches, header["shard_rows"] // batch_size))
                if not group:
                    break  # the source ran out
                need = [s for s in outs if shard not in done[s]] if shard % world == rank else []
                parts: dict[str, list[torch.Tensor]] = {s: [] for s in [*need, "token_ids", "positions"]}
                n_rows = 0
                for ids in group:
                    keep = torch.ones_like(ids, dtype=torch.bool) if header["keep_bos"] else ids != bos
                    take = min(int(keep.sum()), tokens - seen)
                    n_rows += len(ids)
                    if need:
                        tf = time.perf_counter()
                        acts = _site_acts(model, ids, need)
                        idx = keep.flatten().nonzero().squeeze(1)[:take]
                        acts = acts[idx.to(acts.device)].to(torch_dtype).cpu()
                        t_fwd += time.perf_counter() - tf  # .cpu() waits for the device, so this is all compute
                        for s, a in zip(need, acts.split([widths[s] for s in need], dim=1)):
                            parts[s].append(a.contiguous() if len(need) > 1 else a)
                        parts["token_ids"].append(ids.flatten()[idx].int())
                        parts["positions"].append((idx % seq_len).int())
                        computed += take
                    seen += take
                    bar.update(take)
                    if seen >= tokens:
                        break
                start = shard * header["shard_rows"]
                ids_pos = {k: torch.cat(parts[k]) for k in ("token_ids", "positions")} if need else {}
                for s in need:
                    writers[s].put(shard, (start, start + n_rows), {"activations": torch.cat(parts[s]), **ids_pos})
                shard += 1
    finally:
        bar.close()
        batches.close()
        errors = []
        for w in writers.values():  # finished shards reach the disk even on Ctrl-C, so a re-run resumes after them
            try:
                w.close()
            except BaseException as e:
                errors.append(e)
        if errors:
            raise errors[0]
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
    computes the whole fill (same result, W times the compute).

    With several sites, one forward (up to the deepest) serves them all: a block holds the sites side by side and
    each batch is a dict {site: (b, width)}, the same tokens at every site. With `owned` (a subset of the sites,
    under torch.distributed), the ranks still split the forwards of each fill, but each rank receives only the
    owned sites' activations of the whole fill (one gather per owner, an all-to-all) and gets whole global batches
    of them: what a one-process stream gives at those sites.

    With `targets` {site: target site} (transcoders), the forward also reads each target, and a site's rows are
    [activations at the site | at its target] (width widths[site], the target's part target_widths[site]).

    With `passes` P > 1 each fill is served P times, each time permuted anew, before the next is computed: P times
    the training rows for the same forwards (for runs, like `nanosae diff`'s, whose forwards cost more than the SAE
    steps)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        site: str | list[str],
        source: str | os.PathLike | None,
        batch_size: int,
        seq_len: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        buffer_tokens: int | None = None,
        forward_rows: int = 8,
        split: str | None = "train",
        owned: list[str] | None = None,
        targets: dict[str, str] | None = None,
        passes: int = 1,
    ):
        self.model, self.tokenizer, self.source, self.split = model, tokenizer, source, split
        if passes < 1:
            raise NanosaeError(f"passes must be at least 1, got {passes}")
        self.passes, self._held = passes, None
        sites = [site] if isinstance(site, str) else list(site)
        self.sites = list(dict.fromkeys(canonical_site(s, model) for s in sites))
        self.owned = None if owned is None else [canonical_site(s, model) for s in owned]
        if self.owned is not None and not set(self.owned) <= set(self.sites):
            raise NanosaeError(f"owned sites {self.owned} are not all among the stream's sites {self.sites}")
        self.multi = len(self.sites) > 1 or self.owned is not None
        self.site = self.sites[0] if not self.multi else ""
        self.targets = {canonical_site(s, model): canonical_site(t, model) for s, t in (targets or {}).items()}
        for s, t in self.targets.items():
            if s not in self.sites:
                raise NanosaeError(f"target {t} is given for {s}, which is not among the stream's sites {self.sites}")
            check_target(s, t)
        self.read_sites = list(dict.fromkeys([*self.sites, *self.targets.values()]))  # what each forward reads
        self.target_widths = {s: site_width(model, t) for s, t in self.targets.items()}
        self.widths = {s: site_width(model, s) + self.target_widths.get(s, 0) for s in self.sites}
        self.block_sites = self.sites if self.owned is None else [s for s in self.sites if s in self.owned]
        self.d_in = sum(self.widths[s] for s in self.block_sites)
        self.model_name, fingerprint = model_identity(model)
        self.context_size = seq_len = seq_len or model.config.sequence_len
        self.dataset = "builtin" if source is None else str(source)
        if not 2 <= seq_len <= model.cos.size(1):
            raise NanosaeError(f"seq_len {seq_len} is out of range; this model takes 2..{model.cos.size(1)}")
        if buffer_tokens is None:  # several sites: the single-site buffer's bytes, at least a few batches
            buffer_tokens = max((1 << 18) // len(self.sites), 4 * batch_size, seq_len * forward_rows)
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
            **({"sites": self.sites} if self.multi else {"site": self.site}),
            **({"targets": self.targets} if self.targets else {}),
            "dataset": self.dataset,
            "split": split,
            "seq_len": seq_len,
            "seed": seed,
            "buffer_tokens": buffer_tokens,
            "forward_rows": self.forward_rows,
            **({"passes": passes} if passes > 1 else {}),
        }
        # the shuffle buffer's peak: the block, and with several ranks the gathered fill it is made of
        copies = 2 if world_size > 1 else 1
        self.buffer_bytes = copies * self.fill_rows * seq_len * self.d_in * model.compute_dtype.itemsize
        # the ranks that share the forwards; with `owned` each rank then takes whole global batches (rank 0 of 1)
        self.group = (rank, world_size)
        if self.owned is not None:
            if self._distributed() and self.owned != ranks_sites(self.sites, world_size)[rank]:
                raise NanosaeError(f"rank {rank} must own {ranks_sites(self.sites, world_size)[rank]} of {self.sites}")
            rank, world_size = 0, 1
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
        fill = bid[0] // self.passes  # with passes > 1 a fill serves that many blocks, each permuted anew
        if self._held is not None and self._held[0] == fill:
            return self._held[1]
        self._held = None  # the spent fill goes before the next is built: one block in memory, as buffer_bytes says
        ids = self._fill_tokens(fill)
        batches = ids.split(self.forward_rows)
        keep = (ids != self.tokenizer.bos_token_id).to(self.model.device)
        # the block is allocated once and filled forward by forward (BOS dropped): one fill in memory, not two
        block = torch.empty((int(keep.sum()), self.d_in), dtype=self.model.compute_dtype, device=self.model.device)
        at = 0
        with torch.no_grad():
            if self._distributed():
                acts = iter(self._gathered(batches))
            else:
                acts = (self._cols(self._acts(b), self.block_sites) for b in batches)
            for a, k in zip(acts, keep.split(self.forward_rows)):
                rows = a[k.flatten()]
                block[at : at + len(rows)] = rows
                at += len(rows)
        if self.passes > 1:
            self._held = (fill, block)
        return block

    def _distributed(self) -> bool:
        return self.group[1] > 1 and dist_info() == self.group

    def _cols(self, acts: torch.Tensor, sites: list[str]) -> torch.Tensor:
        """The rows of `sites` (each site's columns, then its target's) from `acts`, which holds every site the
        forward reads side by side."""
        parts = [p for s in sites for p in ([s, self.targets[s]] if s in self.targets else [s])]
        if parts == self.read_sites:
            return acts
        cuts = list(itertools.accumulate([0, *(site_width(self.model, s) for s in self.read_sites)]))
        col = dict(zip(self.read_sites, zip(cuts, cuts[1:])))
        return torch.cat([acts[:, col[p][0] : col[p][1]] for p in parts], dim=1)

    def _acts(self, ids: torch.Tensor) -> torch.Tensor:  # every read site's activations side by side, (rows, width)
        return _site_acts(self.model, ids, self.read_sites)

    def _gathered(self, batches: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        # rank r forwards batches r, r+W, …; equal-shape all_gather (with `owned`: a gather to each owner of its
        # sites' columns), padded with zeros where a rank has one less
        (rank, W), n = self.group, len(batches)
        per = math.ceil(n / W)
        mine = [self._acts(batches[j]) for j in range(rank, n, W)]
        owners = [self.sites] if self.owned is None else ranks_sites(self.sites, W)
        got = None
        for owner, sites in enumerate(owners):
            width = sum(self.widths[s] for s in sites)
            shape = (per, self.forward_rows * self.context_size, width)
            send = torch.zeros(shape, dtype=self.model.compute_dtype, device=self.model.device)
            for i, a in enumerate(mine):
                send[i] = self._cols(a, sites)
            if self.owned is None:
                got = [torch.empty_like(send) for _ in range(W)]
                dist.all_gather(got, send)
            else:
                recv = [torch.empty_like(send) for _ in range(W)] if owner == rank else None
                dist.gather(send, recv, dst=owner)
                got = recv if owner == rank else got
        return [got[j % W][j // W] for j in range(n)]

    def __next__(self):
        x = super().__next__()
        if not self.multi:
            return x
        return dict(zip(self.block_sites, x.split([self.widths[s] for s in self.block_sites], dim=1)))


def ranks_sites(sites: list[str], world: int) -> list[list[str]]:
    """Which sites each rank owns under --distribute-sites: contiguous runs of the site list, as even as possible
    (a rank owns none when there are fewer sites than ranks)."""
    return [sites[len(sites) * r // world : len(sites) * (r + 1) // world] for r in range(world)]


def model_stream(
    model: GPT, tokenizer: Tokenizer, site: str | list[str], source, batch_size: int, **options
) -> ActivationStream:
    """Endless shuffled float32 batches (on the model's device) computed straight from the model, BOS excluded;
    no cache needed; with a list of sites, dicts {site: batch} from one forward. A resume re-tokenizes (but does
    not forward) the rows before its position. Options: those of ModelStream (seq_len, seed, rank, world_size,
    state, buffer_tokens (default 2^18 rows, divided among several sites), forward_rows, split, owned)."""
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
        self.widths[self.site] *= 2  # the row of a site is [a^A ; a^B]
        self.buffer_bytes *= 2  # ModelStream counted one model's half of each row
        name_b, fingerprint_b = model_identity(model_b)
        self.model_names = (self.model_name, name_b)
        self.model_name = f"{self.model_name} vs {name_b}"
        self._identity["model_b"] = fingerprint_b
        if options.get("state") is not None and options["state"].get("model_b") != fingerprint_b:
            raise NanosaeError("stream state does not belong to this pair of models; pass the models the run used")

    def _acts(self, ids: torch.Tensor) -> torch.Tensor:
        a = _site_acts(self.model, ids, self.read_sites)
        return torch.cat([a, _site_acts(self.model_b, ids, self.read_sites).to(a)], dim=1)


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
