"""The contextual head's context path: `ContextEncoder`, from the base's tapped layers to one context vector per
position, read top to bottom.

Notation (docs/design.md, 'The contextual head'). For one sequence of T positions, L tapped layers:

    x_l,t  (d_t)        output of tapped decoder layer l at position t (frozen base), read in bf16
    u_t    (d_c)        u_t = sum_l rms(x_l,t) P_l                  P_l: (d_t, d_c)
    a_t    (d_c)        a_t = u_t + Attn(rms(u) γ_a)_t W_O           causal, rotary positions, optional window
    b_t    (d_c)        b_t = a_t + gelu(rms(a_t) γ_m W_1) W_2        W_1: (d_c, 2 d_c), W_2: (2 d_c, d_c)
    s_t    (d_c)        s_t = rms(b_t) γ_s                          the context vector the head's query reads

Without attention ('taps only', `context_attention=False`) a_t = u_t. The attention has `context_heads` heads of
width d_h = d_c / context_heads; its keys and values for earlier positions come from a decoding cache when
generating (`past`), so a step costs one position's work. A key is seen by a query when it is not later, is a real
token (`key_mask`) or the query itself, and lies within `context_window` positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import BackAttnConfig

ROTARY_BASE = 10_000.0
# The tapped states are read in bf16 (rounded once, whatever the base's dtype): a cache of them then takes 2 bytes a
# value and gives exactly what the live path computes, and the context path's own weights stay in the head's dtype.
TAP_DTYPE = torch.bfloat16


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position encoding of x (B, H, T, d_h) at integer positions (B, T): pairs (i, i + d_h/2) turn by
    position * ROTARY_BASE^(-2i/d_h), so that a query-key product depends on their distance only."""
    half = x.shape[-1] // 2
    frequencies = ROTARY_BASE ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # (d_h/2,)
    angles = positions[:, None, :, None].float() * frequencies  # (B, 1, T, d_h/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def visible_keys(query_index: torch.Tensor, key_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, T, S) boolean mask of the keys each query sees. `query_index` (T,): the queries' indices among the S
    keys; `key_mask` (B, S): True at real tokens. A query always sees itself, so a padding query has one key."""
    key_index = torch.arange(key_mask.shape[1], device=key_mask.device)
    earlier = key_index[None, :] <= query_index[:, None]  # (T, S)
    if window is not None:
        earlier = earlier & (query_index[:, None] - key_index[None, :] < window)
    itself = key_index[None, :] == query_index[:, None]
    return (earlier[None] & key_mask[:, None, :]) | itself[None]  # (B, T, S)


class ContextEncoder(nn.Module):
    """The context path: tapped layer outputs (B, T, L, d_t) -> context vectors s (B, T, d_c)."""

    def __init__(self, config: BackAttnConfig, tap_width: int, num_taps: int) -> None:
        super().__init__()
        self.config = config
        width = config.context_dim
        self.tap_proj = nn.Parameter(torch.empty(num_taps, tap_width, width))  # P_l (L, d_t, d_c)
        if config.context_attention:
            self.attention_norm = nn.Parameter(torch.ones(width))  # γ_a
            self.qkv_proj = nn.Parameter(torch.empty(width, 3 * width))  # W_q | W_k | W_v
            self.out_proj = nn.Parameter(torch.empty(width, width))  # W_O
        self.mlp_norm = nn.Parameter(torch.ones(width))  # γ_m
        self.mlp_in = nn.Parameter(torch.empty(width, 2 * width))  # W_1
        self.mlp_out = nn.Parameter(torch.empty(2 * width, width))  # W_2
        self.final_norm = nn.Parameter(torch.ones(width))  # γ_s
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Variance-keeping starts (std 1/sqrt(fan-in)); the head's W_S starts at zero, so none of this shows yet."""
        taps, tap_width, width = self.tap_proj.shape
        nn.init.normal_(self.tap_proj, std=(taps * tap_width) ** -0.5)
        if self.config.context_attention:
            nn.init.normal_(self.qkv_proj, std=width**-0.5)
            nn.init.normal_(self.out_proj, std=width**-0.5)
        nn.init.normal_(self.mlp_in, std=width**-0.5)
        nn.init.normal_(self.mlp_out, std=(2 * width) ** -0.5)

    @property
    def head_width(self) -> int:
        return self.config.context_dim // self.config.context_heads

    def forward(
        self,
        taps: torch.Tensor,
        key_mask: torch.Tensor,
        positions: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Context vectors of T new positions, and the keys and values they add to a decoding cache.

        taps (B, T, L, d_t); key_mask (B, P + T), True at real tokens, over the P cached positions and the new ones;
        positions (B, T), the new positions' rotary positions; past: cached (keys, values), each (B, H_c, P, d_h),
        already rotated. Returns s (B, T, d_c) and the new (keys, values), each (B, H_c, T, d_h); None for both
        without attention.
        """
        eps = self.config.rms_norm_eps
        taps = taps.to(TAP_DTYPE).to(self.tap_proj.dtype)  # read in bf16 (TAP_DTYPE)
        u = torch.einsum("btld,ldc->btc", rms(taps, eps), self.tap_proj)  # (B, T, d_c)
        new_cache = None
        if self.config.context_attention:
            attended, new_cache = self.attend(rms(u, eps) * self.attention_norm, key_mask, positions, past)
            u = u + attended
        u = u + F.gelu(rms(u, eps) * self.mlp_norm @ self.mlp_in) @ self.mlp_out
        return rms(u, eps) * self.final_norm, new_cache

    def attend(
        self,
        a: torch.Tensor,
        key_mask: torch.Tensor,
        positions: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Causal multi-head attention of the T new positions over the cached ones and themselves: (B, T, d_c)."""
        batch, length, width = a.shape
        heads, head_width = self.config.context_heads, self.head_width
        q, k, v = (a @ self.qkv_proj).split(width, dim=-1)  # each (B, T, d_c)
        q, k, v = (t.reshape(batch, length, heads, head_width).transpose(1, 2) for t in (q, k, v))  # (B, H_c, T, d_h)
        q, k = rotate(q, positions), rotate(k, positions)
        keys, values = k, v
        if past is not None and past[0].shape[-2] > 0:
            keys = torch.cat([past[0].to(k.dtype), k], dim=-2)  # (B, H_c, P + T, d_h)
            values = torch.cat([past[1].to(v.dtype), v], dim=-2)
        cached = keys.shape[-2] - length
        query_index = torch.arange(cached, cached + length, device=a.device)
        visible = visible_keys(query_index, key_mask.to(device=a.device, dtype=torch.bool), self.config.context_window)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None])  # (B, H_c, T, d_h)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return out @ self.out_proj, (k, v)


def rotary_positions(key_mask: torch.Tensor, new: int) -> torch.Tensor:
    """Positions of the last `new` of the (B, S) tokens: each real token's count of real tokens before it, as the base
    models number left-padded rows, so that a padded row is numbered as it would be alone."""
    return (key_mask.long().cumsum(dim=-1) - 1).clamp(min=0)[:, key_mask.shape[1] - new :]


def default_context_layers(num_layers: int) -> list[int]:
    """The layers a third and two thirds of the way up, and the last: distinct indices, in order."""
    picks = [max(0, math.ceil(num_layers * fraction) - 1) for fraction in (1 / 3, 2 / 3)] + [num_layers - 1]
    return sorted(set(picks))
