"""Sparse autoencoder architectures: encode, decode, save and load (SAELens v6 folders).

Inference architectures use SAELens' names and tensors:
  standard  f = relu(W_enc^T (x - b_dec) + b_enc)
  topk      f = relu(topk_k(pre))
  jumprelu  f = pre * (pre > threshold)
  gated     f = 1[(x - b_dec) W_enc + b_gate > 0] * relu((x - b_dec)(W_enc * exp(r_mag)) + b_mag)
and x_hat = f W_dec + b_dec. Shapes: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in].
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import NanosaeError
from .fileio import atomic_write, atomic_write_json

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
SAELENS_VERSION = "6.0.0"  # the on-disk format version we write (v6: LLM keys live under `metadata`)


@dataclass
class SAEConfig:
    """What an SAE is and where it reads: the inference architecture, sizes, and the site it was trained on."""

    architecture: str = "topk"
    d_in: int = 0
    d_sae: int = 0
    k: int | None = None  # topk only
    hook_name: str = ""  # nanosae site, e.g. "blocks.2.resid_post"
    model_name: str = ""  # e.g. "nanochat-d20"
    context_size: int = 0
    prepend_bos: bool = True
    dataset_path: str = ""
    dtype: str = "float32"
    training: dict = field(default_factory=dict)  # the training architecture and its recipe, for the record

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise NanosaeError(
                f"unknown SAE architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
            )
        if self.d_in <= 0 or self.d_sae <= 0:
            raise NanosaeError(f"d_in and d_sae must be positive (got {self.d_in}, {self.d_sae})")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise NanosaeError(f"topk needs 0 < k <= d_sae (got k={self.k}, d_sae={self.d_sae})")


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if cfg.architecture == "gated":
            self.b_gate = nn.Parameter(torch.zeros(d_sae))
            self.b_mag = nn.Parameter(torch.zeros(d_sae))
            self.r_mag = nn.Parameter(torch.zeros(d_sae))
        else:
            self.b_enc = nn.Parameter(torch.zeros(d_sae))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (the gate path for gated SAEs)."""
        x = x.to(self.W_enc.dtype) - self.b_dec
        if self.cfg.architecture == "gated":
            return x @ self.W_enc + self.b_gate
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents (..., d_sae) of activations (..., d_in)."""
        arch = self.cfg.architecture
        pre = self.pre_acts(x)
        if arch == "standard":
            return F.relu(pre)
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))
        if arch == "jumprelu":
            return pre * (pre > self.threshold)
        mag = (x.to(self.W_enc.dtype) - self.b_dec) @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return (pre > 0) * F.relu(mag)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def save(self, path: str | os.PathLike, sparsity: torch.Tensor | None = None) -> Path:
        """Write a SAELens v6 folder: cfg.json, sae_weights.safetensors (+ sparsity.safetensors: log10 density)."""
        from safetensors.torch import save

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(path / "sae_weights.safetensors", lambda f: f.write(save(tensors)))
        if sparsity is not None:
            log_density = sparsity.detach().float().cpu().contiguous()
            atomic_write(path / "sparsity.safetensors", lambda f: f.write(save({"sparsity": log_density})))
        atomic_write_json(path / "cfg.json", saelens_cfg(self.cfg))
        return path


def saelens_cfg(cfg: SAEConfig) -> dict:
    """cfg.json as SAELens v6 writes it; nanosae's own fields ride along in `metadata` (kept by SAELens)."""
    from .hooks import saelens_hook_name

    out = {
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "model_name": cfg.model_name,
            "hook_name": saelens_hook_name(cfg.hook_name) if cfg.hook_name else "",
            "hook_head_index": None,
            "context_size": cfg.context_size,
            "prepend_bos": cfg.prepend_bos,
            "dataset_path": cfg.dataset_path,
            "neuronpedia_id": None,
            "nanosae_site": cfg.hook_name,
            "nanosae_training": cfg.training,
        },
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    return out


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load a SAELens folder (ours or SAELens' own: standard, topk, jumprelu, gated)."""
    from safetensors.torch import load_file

    from .hooks import canonical_site

    path = Path(path)
    cfg_file, weights_file = path / "cfg.json", path / "sae_weights.safetensors"
    if not cfg_file.is_file():
        raise NanosaeError(f"{path}: no cfg.json; pass an SAE folder (cfg.json + sae_weights.safetensors)")
    try:
        raw = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise NanosaeError(f"{cfg_file}: not valid JSON ({e})") from None
    meta = raw.get("metadata", {}) or {}
    hook = meta.get("nanosae_site") or meta.get("hook_name") or raw.get("hook_name") or ""
    try:
        hook = canonical_site(hook) if hook else ""
    except NanosaeError:
        pass  # a hook name from another model family: keep it, the SAE can still encode/decode tensors
    known = {f.name for f in dataclasses.fields(SAEConfig)}
    cfg = SAEConfig(
        **{k: raw[k] for k in ("architecture", "d_in", "d_sae", "k", "dtype") if k in raw and k in known},
        hook_name=hook,
        model_name=meta.get("model_name", raw.get("model_name", "")) or "",
        context_size=meta.get("context_size", raw.get("context_size", 0)) or 0,
        prepend_bos=meta.get("prepend_bos", True),
        dataset_path=meta.get("dataset_path", "") or "",
        training=meta.get("nanosae_training", {}) or {},
    )
    if not weights_file.is_file():
        raise NanosaeError(f"{path}: no sae_weights.safetensors")
    try:
        tensors = load_file(weights_file)
    except Exception as e:
        raise NanosaeError(f"{weights_file}: cannot read safetensors ({e})") from None
    sae = SAE(cfg)
    expected = sae.state_dict()
    if set(tensors) != set(expected):
        raise NanosaeError(
            f"{weights_file}: tensors {sorted(tensors)} do not match a {cfg.architecture} SAE ({sorted(expected)})"
        )
    for k, v in expected.items():
        if tensors[k].shape != v.shape:
            raise NanosaeError(f"{weights_file}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
    sae.load_state_dict({k: v.float() for k, v in tensors.items()})
    return sae.to(device)
