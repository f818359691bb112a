"""A deliberately plain nanochat forward pass written from docs/nanochat.md,
independent of nanosae.gpt: explicit per-head loops, explicit masks, and every era's constants spelled out here.
Tests compare nanosae's GPT (logits and hook sites) against it, and random-weight state dicts of each era.
"""

from __future__ import annotations

import math

import torch

EPS = torch.finfo(torch.float32).eps  # F.rms_norm with eps=None


def _ceil128(seq: int, div: int) -> int:
    return math.ceil(seq / div / 128) * 128


# Forward constants of each era, from docs/nanochat.md (not from nanosae).
ERAS: dict[str, dict] = {
    "v0": dict(rope_base=10000.0, rope_bf16=True, qk_scale=1.0, softcap=15.0, lambdas=False, windows=None,
               ve_in=0, ve_mult=0.0, smear=False),
    "lambdas": dict(rope_base=10000.0, rope_bf16=True, qk_scale=1.0, softcap=15.0, lambdas=True,
                    windows=lambda seq: seq // 2, ve_in=0, ve_mult=0.0, smear=False),
    "ve32": dict(rope_base=10000.0, rope_bf16=True, qk_scale=1.0, softcap=15.0, lambdas=True,
                 windows=lambda seq: seq // 2, ve_in=32, ve_mult=2.0, smear=False),
    "softcap20": dict(rope_base=10000.0, rope_bf16=True, qk_scale=1.0, softcap=20.0, lambdas=True,
                      windows=lambda seq: seq // 2, ve_in=32, ve_mult=2.0, smear=False),
    "fp32rope": dict(rope_base=10000.0, rope_bf16=False, qk_scale=1.0, softcap=20.0, lambdas=True,
                     windows=lambda seq: seq // 2, ve_in=32, ve_mult=2.0, smear=False),
    "ve12": dict(rope_base=100000.0, rope_bf16=False, qk_scale=1.15, softcap=15.0, lambdas=True,
                 windows=lambda seq: _ceil128(seq, 3), ve_in=12, ve_mult=3.0, smear=False),
    "current": dict(rope_base=100000.0, rope_bf16=False, qk_scale=1.2, softcap=15.0, lambdas=True,
                    windows=lambda seq: _ceil128(seq, 4), ve_in=12, ve_mult=3.0, smear=True),
}  # fmt: skip


def rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


def ve_layers(n_layer: int, era: dict) -> list[int]:
    return [i for i in range(n_layer) if era["ve_in"] and i % 2 == (n_layer - 1) % 2]


def layer_windows(cfg: dict, era: dict) -> list[int | None]:
    """Left window per layer (None: full causal). S/L pattern tiled over layers, last layer L."""
    if era["windows"] is None:
        return [None] * cfg["n_layer"]
    pattern = cfg.get("window_pattern") or "L"
    out = []
    for i in range(cfg["n_layer"]):
        long = pattern[i % len(pattern)] == "L" or i == cfg["n_layer"] - 1
        out.append(cfg["sequence_len"] if long else era["windows"](cfg["sequence_len"]))
    return out


def rope(x: torch.Tensor, base: float, bf16: bool) -> torch.Tensor:
    """x (B, T, H, hd): rotate the two halves by -theta (nanochat's convention)."""
    T, hd = x.shape[1], x.shape[3]
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angle = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos(), angle.sin()
    if bf16:
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def attention(q, k, v, window: int | None) -> torch.Tensor:
    """q (B,T,H,hd), k/v (B,T,KV,hd); query head h reads kv head h // (H // KV); explicit mask."""
    B, T, H, hd = q.shape
    group = H // k.shape[2]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (i - j <= window)  # a window w shows w+1 keys, the query's own included
    out = torch.empty_like(q)
    for h in range(H):
        kv = h // group
        scores = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, kv]) / math.sqrt(hd)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[:, :, h] = torch.einsum("bij,bjd->bid", scores.softmax(-1), v[:, :, kv])
    return out


def forward(
    sd: dict[str, torch.Tensor],
    cfg: dict,
    era: str | dict,
    idx: torch.Tensor,
    edits: dict | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(softcapped fp32 logits, {site: activation}) of nanochat's forward for `era` (a name or a constants dict).
    `edits` maps a site name to f(x) -> x applied where the site is, so edits propagate downstream."""
    era = ERAS[era] if isinstance(era, str) else era
    w = {k: v.float() for k, v in sd.items()}
    edits = edits or {}
    acts: dict[str, torch.Tensor] = {}

    def site(name: str, x: torch.Tensor) -> torch.Tensor:
        if name in edits:
            x = edits[name](x)
        acts[name] = x
        return x

    B, T = idx.shape
    L, C, H, KV = cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
    hd = C // H
    windows = layer_windows(cfg, era)
    ves = ve_layers(L, era)

    e = rms(w["transformer.wte.weight"][idx])
    x = e.clone()
    if era["smear"]:
        gate = w["smear_lambda"] * torch.sigmoid(e[..., :24] @ w["smear_gate.weight"].T)
        x[:, 1:] = e[:, 1:] + gate[:, 1:] * e[:, :-1]
    x = site("embed", x)
    x0 = x
    x_backout = None
    for i in range(L):
        p = f"transformer.h.{i}."
        if era["lambdas"]:
            x = w["resid_lambdas"][i] * x + w["x0_lambdas"][i] * x0
        x = site(f"blocks.{i}.resid_pre", x)
        h = rms(x)
        q = (h @ w[p + "attn.c_q.weight"].T).view(B, T, H, hd)
        k = (h @ w[p + "attn.c_k.weight"].T).view(B, T, KV, hd)
        v = (h @ w[p + "attn.c_v.weight"].T).view(B, T, KV, hd)
        if i in ves:
            g = era["ve_mult"] * torch.sigmoid(h[..., : era["ve_in"]] @ w[p + "attn.ve_gate.weight"].T)
            v = v + g[..., None] * w[f"value_embeds.{i}.weight"][idx].view(B, T, KV, hd)
        q, k = rope(q, era["rope_base"], era["rope_bf16"]), rope(k, era["rope_base"], era["rope_bf16"])
        q, k = rms(q) * era["qk_scale"], rms(k) * era["qk_scale"]
        y = attention(q, k, v, windows[i]).reshape(B, T, C)
        a = site(f"blocks.{i}.attn_out", y @ w[p + "attn.c_proj.weight"].T)
        x = site(f"blocks.{i}.resid_mid", x + a)
        u = site(f"blocks.{i}.mlp_in", rms(x))
        hid = site(f"blocks.{i}.mlp_hidden", torch.relu(u @ w[p + "mlp.c_fc.weight"].T) ** 2)
        m = site(f"blocks.{i}.mlp_out", hid @ w[p + "mlp.c_proj.weight"].T)
        x = site(f"blocks.{i}.resid_post", x + m)
        if era["smear"] and i == L // 2:
            x_backout = x
    if x_backout is not None:
        x = x - w["backout_lambda"] * x_backout
    x = site("final", rms(x))
    logits = (x @ w["lm_head.weight"].T)[..., : cfg["vocab_size"]]
    cap = era["softcap"]
    return cap * torch.tanh(logits / cap), acts


def random_state_dict(cfg: dict, era: str, seed: int = 0, pad: bool | None = None) -> dict[str, torch.Tensor]:
    """Random weights of an era with nanochat's keys, shapes and save order, scaled so that every part of the
    network (attention pattern, gates, lambdas, softcap) visibly moves the logits."""
    e = ERAS[era]
    g = torch.Generator().manual_seed(seed)
    L, C, H, KV, V = cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["vocab_size"]
    hd = C // H
    pad = era != "v0" if pad is None else pad
    Vp = math.ceil(V / 64) * 64 if pad else V

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def uniform(*shape, lo, hi):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    sd: dict[str, torch.Tensor] = {}
    if e["lambdas"]:
        sd["resid_lambdas"] = uniform(L, lo=0.8, hi=1.2)
        sd["x0_lambdas"] = uniform(L, lo=0.1, hi=0.5)
    if e["smear"]:
        sd["smear_lambda"] = torch.tensor([0.6])
        sd["backout_lambda"] = torch.tensor([0.4])
    sd["transformer.wte.weight"] = randn(Vp, C)
    for i in range(L):
        p = f"transformer.h.{i}."
        sd[p + "attn.c_q.weight"] = randn(H * hd, C, std=C**-0.5)
        sd[p + "attn.c_k.weight"] = randn(KV * hd, C, std=C**-0.5)
        sd[p + "attn.c_v.weight"] = randn(KV * hd, C, std=C**-0.5)
        sd[p + "attn.c_proj.weight"] = randn(C, C, std=C**-0.5)
        if i in ve_layers(L, e):
            sd[p + "attn.ve_gate.weight"] = randn(KV, e["ve_in"], std=0.5)
        sd[p + "mlp.c_fc.weight"] = randn(4 * C, C, std=C**-0.5)
        sd[p + "mlp.c_proj.weight"] = randn(C, 4 * C, std=(4 * C) ** -0.5)
    sd["lm_head.weight"] = randn(Vp, C, std=12 * C**-0.5)  # logits of ~12: the softcap matters
    if e["smear"]:
        sd["smear_gate.weight"] = randn(1, 24, std=0.5)
    for i in ve_layers(L, e):
        sd[f"value_embeds.{i}.weight"] = randn(Vp, KV * hd)
    return sd
