"""Live feature tracking and steering at an SAE's site, during any forward or KV-cache generation.

Tracking: a hook at `sae.cfg.hook_name` encodes every position the model reads (the prefill and each decode
step) and keeps its top-N latents; one encoder matmul and one topk per forward, results copied to the host
without a sync of their own (the generation's sampling syncs anyway).

Steering edits the activation at the same site (several latents at once):
  add     x += a · u_i · W_dec[i], where the unit u_i is the latent's max activation from feature statistics
          when given (Neuronpedia's default steering strength), else ‖x_t‖ / ‖W_dec[i]‖ at each position
          (a = 1 then adds a vector as long as the activation itself)
  clamp   x' = decode(f with f_i := v) + (x − decode(f)) = x + (v − f_i) · W_dec[i]: the SAE error is kept
  ablate  clamp to 0
on every position, or only on generated ones (positions after the latest prefill). A transcoder is tracked at its
input site and steered at its output site (the block's MLP output for an mlp_in -> mlp_out transcoder): add writes
a · u_i · W_dec[i] there, clamp uses f_i of the input read earlier in the same forward.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import NanosaeError
from .features import RECOMPUTE, STATS_VERSION, direction_to_resid
from .fileio import sha256_file, verify_sha256
from .generate import generate_stream
from .gpt import GPT
from .hooks import add_hooks, out_site, sae_site
from .labels import load_labels
from .sae import SAE, load_sae, sae_folder

# ---------------------------------------------------------------------------------------------------- tracking


@dataclass
class TokenLatents:
    """The active latents (largest first, zeros dropped) of one position of one batch row."""

    pos: int
    ids: list[int]
    values: list[float]
    row: int = 0


class Tracker:
    """A hook that keeps the top-N latents of every position the model reads. `records` grows in reading
    order; `callback(record)` gets each one as soon as it is on the host (at once on CPU; on GPU at the next
    `flush()`, which generation loops call after each token)."""

    def __init__(self, sae: SAE, top_n: int = 8, callback: Callable[[TokenLatents], None] | None = None):
        if top_n < 1:
            raise NanosaeError(f"top_n must be at least 1 (got {top_n})")
        self.sae, self.top_n, self.callback = sae, top_n, callback
        self.records: list[TokenLatents] = []
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.cuda.Event | None]] = []

    def hook(self, x: torch.Tensor, start: int) -> None:
        vals, ids = self.sae.encode_sparse(x.detach(), self.top_n)
        event = None
        if vals.is_cuda:  # start the copy now, wait for it only in flush()
            vals, ids = vals.to("cpu", non_blocking=True), ids.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending.append((start, vals, ids, event))
        if event is None:
            self.flush()

    def flush(self) -> list[TokenLatents]:
        """Move finished results to `records` (and the callback); returns the new records."""
        new = []
        for start, vals, ids, event in self._pending:
            if event is not None:
                event.synchronize()
            for row, (vrow, irow) in enumerate(zip(vals.tolist(), ids.tolist())):
                for t, (v, i) in enumerate(zip(vrow, irow)):
                    keep = [k for k, val in enumerate(v) if val > 0]
                    new.append(TokenLatents(start + t, [i[k] for k in keep], [v[k] for k in keep], row))
        self._pending.clear()
        self.records.extend(new)
        if self.callback is not None:
            for rec in new:
                self.callback(rec)
        return new


@contextmanager
def track(
    model: GPT, sae: SAE, top_n: int = 8, callback: Callable[[TokenLatents], None] | None = None
) -> Iterator[Tracker]:
    """Record the top-N latents of every position the model reads inside the block."""
    tracker = Tracker(sae, top_n, callback)
    with add_hooks(model, {sae_site(model, sae): tracker.hook}):
        try:
            yield tracker
        finally:
            tracker.flush()


# ---------------------------------------------------------------------------------------------------- steering


@dataclass(frozen=True)
class Steer:
    """One edit of one latent: `add` (a multiple of the latent's unit, see the module doc) or `clamp` (a value
    in activation units; 0 ablates)."""

    latent: int
    add: float | None = None
    clamp: float | None = None

    def __post_init__(self):
        if (self.add is None) == (self.clamp is None):
            raise NanosaeError(f"steer latent {self.latent}: give exactly one of add or clamp")

    @classmethod
    def ablate(cls, latent: int) -> Steer:
        return cls(latent, clamp=0.0)

    def __str__(self) -> str:
        if self.add is not None:
            return f"{self.latent}:{self.add:+g}"
        return f"{self.latent}={self.clamp:g}" if self.clamp else f"{self.latent} ablated"


_STEER_RE = re.compile(r"\s*(\d+)\s*(?::|\s)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


def parse_steer(text: str, kind: str = "steer", prefix: str = "--") -> Steer:
    """`123:+8` (steer, add 8 units), `45:0` (clamp to 0), `7` (ablate); a space may replace the colon.
    `prefix` names the flag or command in error messages (`--` for the CLI, `/` in the chat)."""
    sep = ":" if prefix == "--" else " "
    if kind == "ablate":
        if not text.strip().isdigit():
            raise NanosaeError(f"{prefix}ablate {text!r}: give a latent id, e.g. {prefix}ablate 7")
        return Steer.ablate(int(text))
    m = _STEER_RE.fullmatch(text)
    if not m or kind not in ("steer", "clamp"):
        example = f"{prefix}{kind} 123{sep}{'+8' if kind == 'steer' else '0'}"
        raise NanosaeError(f"{prefix}{kind} {text!r}: write LATENT{sep}VALUE, e.g. {example}")
    value = float(m[2])
    return Steer(int(m[1]), add=value) if kind == "steer" else Steer(int(m[1]), clamp=value)


def check_steers(sae: SAE, steers: Iterable[Steer]) -> None:
    for s in steers:
        if not 0 <= s.latent < sae.cfg.d_sae:
            raise NanosaeError(f"latent {s.latent} does not exist; this SAE has latents 0..{sae.cfg.d_sae - 1}")


class Steering:
    """A hook that applies a set of Steers at the SAE's site. `units` (d_sae,) are the latents' typical
    activations (max activations from feature statistics); without them, or where a unit is 0 (a latent
    never seen firing), `add` is relative to ‖x_t‖."""

    def __init__(
        self, sae: SAE, steers: Sequence[Steer], only_generated: bool = False, units: torch.Tensor | None = None
    ):
        d_sae = sae.cfg.d_sae
        check_steers(sae, steers)
        if units is not None and units.shape != (d_sae,):
            raise NanosaeError(f"steering units must have shape ({d_sae},), got {tuple(units.shape)}")
        self.sae, self.steers, self.only_generated = sae, list(steers), only_generated
        dev, W = sae.W_dec.device, sae.W_dec.detach()
        adds = [s for s in self.steers if s.add is not None]
        clamps = [s for s in self.steers if s.clamp is not None]
        self.add_vec = self.add_dir = None
        if adds:
            ids = torch.tensor([s.latent for s in adds], device=dev)
            coef = torch.tensor([s.add for s in adds], device=dev, dtype=W.dtype)
            u = units.to(dev, W.dtype)[ids] if units is not None else torch.zeros_like(coef)
            # latents with a unit get a fixed vector; the others (no stats, or never seen firing) one × ‖x_t‖
            norm_based = u <= 0
            if not norm_based.all():
                self.add_vec = (coef * u.clamp_min(0)) @ W[ids]
            if norm_based.any():
                Wn = W[ids][norm_based]
                self.add_dir = coef[norm_based] @ (Wn / Wn.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        self.clamp_ids = torch.tensor([s.latent for s in clamps], device=dev, dtype=torch.long)
        self.clamp_to = torch.tensor([s.clamp for s in clamps], device=dev, dtype=W.dtype)
        self.prompt_end = 0
        self.x_in: torch.Tensor | None = None  # a transcoder's input in this forward

    def hooks(self, model: GPT) -> dict[str, list[Callable]]:
        """Its hooks by site: at the SAE's site; for a transcoder, at its output site, after a reader of its input."""
        site = out_site(model, self.sae)
        if not self.sae.cfg.transcoder:
            return {site: [self.hook]}
        return {sae_site(model, self.sae): [self._read], site: [self.hook]}

    def _read(self, x: torch.Tensor, start: int) -> None:
        self.x_in = x

    def hook(self, x: torch.Tensor, start: int) -> torch.Tensor | None:
        if start == 0:  # a forward from position 0 is a new prompt (the prefill); later positions are generated
            self.prompt_end = x.size(1)
        first = max(self.prompt_end - start, 0) if self.only_generated else 0
        if first >= x.size(1):
            return None
        xs = x[:, first:].to(self.sae.W_dec.dtype)
        delta = torch.zeros_like(xs)
        if self.add_vec is not None:
            delta += self.add_vec
        if self.add_dir is not None:
            delta += xs.norm(dim=-1, keepdim=True) * self.add_dir
        if len(self.clamp_ids):
            x_in = xs if self.x_in is None else self.x_in[:, first:].to(xs.dtype)
            f = self.sae.encode(x_in)[..., self.clamp_ids]
            delta += (self.clamp_to - f) @ self.sae.W_dec[self.clamp_ids]
        steered = (xs + delta).to(x.dtype)
        return steered if first == 0 else torch.cat([x[:, :first], steered], dim=1)


@contextmanager
def steer(
    model: GPT,
    sae: SAE,
    steers: Sequence[Steer],
    only_generated: bool = False,
    units: torch.Tensor | None = None,
) -> Iterator[Steering]:
    """Apply `steers` to every forward inside the block; leaving it restores the model exactly."""
    steering = Steering(sae, steers, only_generated, units)
    hooks = steering.hooks(model) if steers else {}
    with add_hooks(model, hooks):
        yield steering


# ---------------------------------------------------------------------------------------------------- generation


@torch.inference_mode()
def generate_tracked(
    model: GPT,
    sae: SAE,
    tokens: list[int],
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 42,
    stop_tokens: Iterable[int] | None = None,
    steers: Sequence[Steer] = (),
    only_generated: bool = False,
    units: torch.Tensor | None = None,
    tracker: Tracker | None = None,
    lock: AbstractContextManager | None = None,
) -> Iterator[tuple[int, TokenLatents]]:
    """Generate like generate_stream, yielding (token id, that token's top latents). The prompt's records
    land in `tracker.records` first. The hooks are installed only around each model step (under `lock` when
    given), so generations that share one model interleave token by token without seeing each other's
    steering."""
    site = sae_site(model, sae)
    tracker = tracker or Tracker(sae)
    hooks = Steering(sae, steers, only_generated, units).hooks(model) if steers else {}
    hooks[site] = hooks.get(site, []) + [tracker.hook]  # after an SAE's steering: it tracks what the model reads
    stream = generate_stream(model, tokens, max_tokens, temperature, top_k, seed, stop_tokens, read_last=True)
    pending = None
    while True:
        with lock or nullcontext(), add_hooks(model, hooks):
            token = next(stream, None)  # reads the previous token (or the prompt), then samples this one
        tracker.flush()
        if pending is not None:
            yield pending, tracker.records[-1]
        if token is None:
            return
        pending = token


# ------------------------------------------------------------------------------------------- what a latent does


def residual_directions(model: GPT, sae: SAE) -> torch.Tensor:
    """Each latent's decoder direction in the residual stream (d_sae, n_embd)."""
    return direction_to_resid(model, out_site(model, sae), sae.W_dec.detach().float())


def logit_effects(model: GPT, directions: torch.Tensor) -> torch.Tensor:
    """Direct logit effect (..., vocab) of residual directions: the unembedding applied to them (final norm
    and later layers ignored)."""
    W_U = model.lm_head.weight.detach()[: model.config.vocab_size]
    return directions.to(W_U.dtype) @ W_U.T


# ---------------------------------------------------------------------------------------------------- loading


def read_units(sae_dir: str | os.PathLike) -> torch.Tensor | None:
    """Each latent's max activation from the feature statistics `nanosae viz` keeps in <sae_dir>/feature_stats,
    when they exist and were computed for these weights; else None (steering then scales by the norm)."""
    stats = Path(sae_dir) / "feature_stats"
    try:
        key = json.loads((stats / "key.json").read_text())
        weights = sha256_file(Path(sae_dir) / "sae_weights.safetensors")
        if key.get("sae") != weights or key.get("version") != STATS_VERSION:
            return None  # statistics of other weights, or of an older nanosae
        verify_sha256(stats / "stats.safetensors", RECOMPUTE)  # damaged units would scale every steer wrongly
        from safetensors import safe_open

        with safe_open(str(stats / "stats.safetensors"), "pt") as f:
            return f.get_tensor("max").float()
    except (OSError, ValueError, KeyError):
        return None


def load_runtime(sae_dir: str | os.PathLike, model: GPT) -> tuple[SAE, torch.Tensor | None, dict[int, str]]:
    """(sae on the model's device, steering units or None, labels) for an SAE folder, checked against the model."""
    sae = load_sae(sae_dir, device=model.device).requires_grad_(False)
    sae_site(model, sae)
    folder = sae_folder(sae_dir)  # sae_dir may name a file in it (best_model.pt)
    units = read_units(folder)
    if units is not None and units.shape != (sae.cfg.d_sae,):
        units = None
    return sae, None if units is None else units.to(model.device), load_labels(folder)
