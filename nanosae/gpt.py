"""nanochat's GPT, written from its facts in docs/nanochat.md, for every checkpoint generation.

nanochat changed its forward pass many times without a version field; the constants of each generation live
in GENERATIONS below and `detect_generation` tells them apart from a state dict's keys and shapes.
The forward calls named hook sites (see hooks.py) only when hooks are registered, so the unhooked path is
the plain model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import NanosaeError


@dataclass
class GPTConfig:
    """nanochat's GPTConfig, field for field (meta_*.json `model_config`)."""

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "L"


@dataclass(frozen=True)
class Generation:
    """The forward-pass constants of one era of nanochat's gpt.py (docs/nanochat.md, "Generations")."""

    name: str
    since: str  # first nanochat commit date with these constants
    rope_base: float
    rope_bf16: bool  # cos/sin tables rounded to bf16 even on CPU (until 2026-03-04)
    qk_scale: float  # q and k multiplied after QK-norm (1.0: none)
    softcap: float  # logits = softcap * tanh(logits / softcap); 0: no cap
    lambdas: bool  # resid_lambdas / x0_lambdas mixing before every block
    windows: bool  # sliding windows from config.window_pattern
    short_window: Callable[[int], int]  # "S" window width from sequence_len
    ve_gate_in: int  # channels feeding the value-embedding gate (0: no value embeddings)
    ve_gate_mult: float
    smear: bool  # smear (previous-token mixing) and backout
    norm_eps: float | None = None  # RMSNorm epsilon (None: finfo(dtype).eps, nanochat's F.rms_norm default)


def _ceil128(div: int) -> Callable[[int], int]:
    return lambda seq: math.ceil(seq / div / 128) * 128


_V0 = Generation(
    name="v0",
    since="2025-10-13",
    rope_base=10000.0,
    rope_bf16=True,
    qk_scale=1.0,
    softcap=15.0,
    lambdas=False,
    windows=False,
    short_window=lambda seq: seq,
    ve_gate_in=0,
    ve_gate_mult=0.0,
    smear=False,
)
_LAMBDAS = replace(_V0, name="lambdas", since="2026-01-11", lambdas=True, windows=True, short_window=lambda s: s // 2)
_VE32 = replace(_LAMBDAS, name="ve32", since="2026-01-16", ve_gate_in=32, ve_gate_mult=2.0)
_SOFTCAP20 = replace(_VE32, name="softcap20", since="2026-03-02", softcap=20.0)
_FP32ROPE = replace(_SOFTCAP20, name="fp32rope", since="2026-03-04", rope_bf16=False)
_VE12 = replace(
    _FP32ROPE,
    name="ve12",
    since="2026-03-09",
    rope_base=100000.0,
    qk_scale=1.15,
    softcap=15.0,
    short_window=_ceil128(3),
    ve_gate_in=12,
    ve_gate_mult=3.0,
)
_CURRENT = replace(_VE12, name="current", since="2026-03-14", qk_scale=1.2, short_window=_ceil128(4), smear=True)
# transformers' NanoChatForCausalLM (model_type "nanochat"): v0's architecture with RoPE tables kept in fp32 and
# RMSNorm epsilon 1e-6; its config.json may set the RoPE base, softcap and epsilon (checkpoint.py reads them)
_HF = replace(_V0, name="hf", rope_bf16=False, norm_eps=1e-6)

GENERATIONS: dict[str, Generation] = {
    g.name: g for g in (_V0, _LAMBDAS, _VE32, _SOFTCAP20, _FP32ROPE, _VE12, _CURRENT, _HF)
}
SMEAR_CHANNELS = 24


def detect_generation(state_dict: dict[str, torch.Tensor], model_config: dict | None = None) -> str:
    """Tell the generation from keys and shapes. Eras with identical weights (ve32/softcap20/fp32rope) resolve
    to the earliest; pass an explicit generation to pick a later one."""
    if "smear_gate.weight" in state_dict:
        return "current"
    gates = [v for k, v in state_dict.items() if k.endswith("attn.ve_gate.weight")]
    if gates:
        return "ve12" if gates[0].shape[1] == 12 else "ve32"
    if "resid_lambdas" in state_dict or (model_config or {}).get("window_pattern") is not None:
        return "lambdas"
    return "v0"


def norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    # parameter-free RMSNorm; eps=None means finfo(dtype).eps, exactly as nanochat
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class Linear(nn.Linear):
    """Bias-free linear whose weight is cast to the activation dtype (a no-op when they already agree)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # see Embedding
            super().reset_parameters()


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        # A model built on the meta device only describes shapes (a checkpoint fills it); initialising meta
        # tensors would import torch._dynamo, seconds of every load.
        if not self.weight.is_meta:
            super().reset_parameters()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # half-split (not interleaved), rotation by -theta, as nanochat keeps it for checkpoint compatibility
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)


class KVCache:
    """Keys/values for every layer, laid out (layer, B, n_kv_head, T, head_dim) so slices feed SDPA directly.
    `pos` advances after the last layer; `prev_embedding` is the smear state (last pre-smear embedding)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype: torch.dtype):
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.prev_embedding: torch.Tensor | None = None

    def reset(self) -> None:
        self.pos = 0
        self.prev_embedding = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, start: int) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of queries at positions start.. over keys 0..start+Tq-1.
    A window w lets a query see itself and the w keys before it."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if start == 0 and Tq == Tk and (window is None or window >= Tq):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if Tq == 1:
        lo = 0 if window is None else max(0, Tk - 1 - window)
        return F.scaled_dot_product_attention(q, k[:, :, lo:], v[:, :, lo:], enable_gqa=gqa)
    qpos = torch.arange(start, start + Tq, device=q.device)[:, None]
    kpos = torch.arange(Tk, device=q.device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos >= qpos - window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, gen: Generation, has_ve: bool):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.gen = gen
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate = Linear(gen.ve_gate_in, self.n_kv_head) if has_ve else None

    def forward(self, x, ve, cos, sin, window, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        hd = self.head_dim
        q = self.c_q(x).view(B, T, self.n_head, hd)
        k = self.c_k(x).view(B, T, self.n_kv_head, hd)
        v = self.c_v(x).view(B, T, self.n_kv_head, hd)
        if ve is not None:  # value residual: gate from the first channels of the normed block input
            gate = self.gen.ve_gate_mult * torch.sigmoid(self.ve_gate(x[..., : self.gen.ve_gate_in]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q, self.gen.norm_eps), norm(k, self.gen.norm_eps)
        if self.gen.qk_scale != 1.0:
            q, k = q * self.gen.qk_scale, k * self.gen.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        start = 0
        if cache is not None:
            start = cache.pos
            if start + T > cache.max_len:
                raise NanosaeError(f"the KV cache holds {cache.max_len} positions but {start + T} were fed")
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k, v = cache.k[layer, :, :, : start + T], cache.v[layer, :, :, : start + T]
        y = attend(q, k, v, window, start)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, gen: Generation, has_ve: bool):
        super().__init__()
        self.attn = CausalSelfAttention(config, gen, has_ve)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, cache, layer, hook) -> torch.Tensor:
        eps = self.attn.gen.norm_eps
        a = self.attn(norm(x, eps), ve, cos, sin, window, cache, layer)
        if hook:
            a = hook("attn_out", a)
        x = x + a
        if hook:
            x = hook("resid_mid", x)
        u = norm(x, eps)
        if hook:
            u = hook("mlp_in", u)
        h = F.relu(self.mlp.c_fc(u)).square()
        if hook:
            h = hook("mlp_hidden", h)
        m = self.mlp.c_proj(h)
        if hook:
            m = hook("mlp_out", m)
        return x + m


HookFn = Callable[[torch.Tensor, int], "torch.Tensor | None"]


class GPT(nn.Module):
    """nanochat's GPT. `hooks` maps a site name to functions f(activation, start_pos) -> replacement or None;
    hooks.py manages it."""

    def __init__(
        self, config: GPTConfig, generation: str | Generation = "current", padded_vocab: int | None = None
    ) -> None:
        super().__init__()
        if isinstance(generation, str) and generation not in GENERATIONS:
            raise NanosaeError(f"unknown generation {generation!r}; choose one of {', '.join(GENERATIONS)}")
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise NanosaeError(f"n_embd ({config.n_embd}) must divide by n_head and n_head by n_kv_head")
        self.config = config
        # a Generation object: constants read from a file (a Hugging Face config.json) rather than a named era
        self.gen = gen = GENERATIONS[generation] if isinstance(generation, str) else generation
        if padded_vocab is None:
            padded_vocab = config.vocab_size if gen.name in ("v0", "hf") else math.ceil(config.vocab_size / 64) * 64
        self.padded_vocab = padded_vocab
        L, C = config.n_layer, config.n_embd
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.ve_layers = [i for i in range(L) if gen.ve_gate_in and i % 2 == (L - 1) % 2]
        self.transformer = nn.ModuleDict(
            {
                "wte": Embedding(padded_vocab, C),
                "h": nn.ModuleList([Block(config, gen, i in self.ve_layers) for i in range(L)]),
            }
        )
        self.lm_head = Linear(C, padded_vocab)
        if gen.lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(L))
            self.x0_lambdas = nn.Parameter(torch.zeros(L))
        if gen.smear:
            self.smear_gate = Linear(SMEAR_CHANNELS, 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        if self.ve_layers:
            self.value_embeds = nn.ModuleDict({str(i): Embedding(padded_vocab, kv_dim) for i in self.ve_layers})
        self.windows = self.window_sizes()
        n_rope = 10 * config.sequence_len
        if self.lm_head.weight.is_meta:  # shapes only, as above; build_model computes the tables
            cos = sin = torch.empty(1, n_rope, 1, C // config.n_head // 2)
        else:
            cos, sin = self._rope_tables(n_rope)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.hooks: dict[str, list[HookFn]] = {}

    def window_sizes(self) -> list[int | None]:
        """Per-layer attention window (None = plain causal), nanochat's rule: pattern tiled, last layer long."""
        cfg = self.config
        if not self.gen.windows:
            return [None] * cfg.n_layer
        pattern = (cfg.window_pattern or "L").upper()
        if set(pattern) - {"S", "L"}:
            raise NanosaeError(f"window_pattern {cfg.window_pattern!r} may only hold S and L")
        short = self.gen.short_window(cfg.sequence_len)
        sizes = [short if pattern[i % len(pattern)] == "S" else cfg.sequence_len for i in range(cfg.n_layer)]
        sizes[-1] = cfg.sequence_len
        return sizes

    def _rope_tables(self, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        hd = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (self.gen.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        angles = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        if self.gen.rope_bf16:
            cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
        return cos[None, :, None, :], sin[None, :, None, :]

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """nanochat's initialisation (for training from scratch; a checkpoint overrides it)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        C, L = self.config.n_embd, self.config.n_layer
        bound = math.sqrt(3) / math.sqrt(C)

        def uniform(t, lo, hi):
            t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=gen))

        def normal(t, std):
            t.copy_(torch.empty(t.shape).normal_(0.0, std, generator=gen))

        normal(self.transformer.wte.weight, 0.8)
        normal(self.lm_head.weight, 0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                uniform(lin.weight, -bound, bound)
            uniform(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
            if block.attn.ve_gate is not None:
                uniform(block.attn.ve_gate.weight, 0.0, 0.02)
        for emb in getattr(self, "value_embeds", {}).values():
            uniform(emb.weight, -bound, bound)
        if self.gen.lambdas:
            frac = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * frac)
            self.x0_lambdas.copy_(0.20 - 0.15 * frac)
        if self.gen.smear:
            uniform(self.smear_gate.weight, 0.0, 0.02)
            self.smear_lambda.zero_()
            self.backout_lambda.fill_(0.2)

    def _run_hooks(self, name: str, x: torch.Tensor, pos: int) -> torch.Tensor:
        for fn in self.hooks.get(name, ()):
            y = fn(x, pos)
            if y is not None:
                x = y
        return x

    def _smear(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        # mix the previous token's pre-smear embedding into each token, gated by the current token
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        prev = cache.prev_embedding if cache is not None and cache.pos > 0 else None
        if prev is not None:
            out = x + gate * torch.cat([prev, x[:, :-1]], dim=1)
        else:
            out = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        if cache is not None:
            cache.prev_embedding = x[:, -1:]
        return out

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        stop_after_layer: int | None = None,
        loss_reduction: str = "mean",
    ) -> torch.Tensor | None:
        """Softcapped fp32 logits (B, T, vocab); the loss when targets are given; None when the forward stops
        after block `stop_after_layer` (-1: after the embedding) because only earlier sites are needed."""
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        if pos + T > self.cos.size(1):
            raise NanosaeError(
                f"{pos + T} tokens exceed the model's RoPE table ({self.cos.size(1)}); feed fewer tokens"
            )
        if stop_after_layer is not None:
            if kv_cache is not None:
                raise NanosaeError("stop_after_layer cannot be combined with a KV cache")
            if not -1 <= stop_after_layer < self.config.n_layer:
                raise NanosaeError(f"stop_after_layer {stop_after_layer}: pick -1..{self.config.n_layer - 1}")
        dtype = self.compute_dtype
        cos, sin = self.cos[:, pos : pos + T].to(dtype), self.sin[:, pos : pos + T].to(dtype)
        hooks = self.hooks

        eps = self.gen.norm_eps
        x = norm(self.transformer.wte(idx).to(dtype), eps)
        if self.gen.smear:
            x = self._smear(x, kv_cache)
        if hooks:
            x = self._run_hooks("embed", x, pos)
        if stop_after_layer == -1:
            return None
        x0 = x
        backout_layer = self.config.n_layer // 2
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            hook = None
            if hooks:
                prefix = f"blocks.{i}."

                def hook(kind, t, prefix=prefix):
                    return self._run_hooks(prefix + kind, t, pos)

            if self.gen.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if hook:
                x = hook("resid_pre", x)
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if i in self.ve_layers else None
            x = block(x, ve, cos, sin, self.windows[i], kv_cache, i, hook)
            if hook:
                x = hook("resid_post", x)
            if stop_after_layer == i:
                return None
            if self.gen.smear and i == backout_layer:
                x_backout = x
        if kv_cache is not None:
            kv_cache.pos += T
        if x_backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = norm(x, eps)
        if hooks:
            x = self._run_hooks("final", x, pos)
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        cap = self.gen.softcap
        if cap:
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_len, self.device, self.compute_dtype)

    def set_compute_dtype(self, dtype: torch.dtype) -> GPT:
        """bf16 (or fp32) compute: matrices and embeddings take the dtype, learned scalars stay fp32, as in
        nanochat where 0-dim fp32 lambdas times bf16 activations stay bf16."""
        scalars = {"resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"}
        for name, p in self.named_parameters():
            if name not in scalars:
                p.data = p.data.to(dtype)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Forward FLOPs per token of the matmuls (2 per multiply-add), attention scores over the full context."""
        cfg = self.config
        dense = sum(p.numel() for n, p in self.named_parameters() if n.endswith(".weight") and "h." in n)
        dense += self.lm_head.weight.numel()
        attn = cfg.n_layer * 2 * cfg.n_embd * cfg.sequence_len  # QK^T and AV per token
        return 2.0 * dense + 2.0 * attn
