"""PyTorch reference of DiffuSeq's TransformerNetModel (SPEC §3), test-only.

Written without the ``transformers`` package, but with module names chosen so
that ``state_dict()`` keys are exactly DiffuSeq's (HuggingFace BertEncoder
naming).  The package itself never imports torch; this file is the yardstick
for the C core in tests and benchmarks.

Usage::

    ref = TorchDiffuSeq(cfg)                      # cfg: dlmone.ModelConfig-like
    load_numpy_state(ref, model.state_dict())     # same weights as the C model
    y = ref(x, t_scaled)                          # x [B,L,E], t_scaled [B] float
    ref.last_hidden                               # last encoder output [B,L,H]
    ref.get_logits(y)                             # [B,L,V]

The two recipe options of ``dlmone.ModelConfig`` (SPEC §5.1) are mirrored:
``self_conditioning`` (input concat(x, x_self_cond), projected by a Linear(2E -> H):
``input_up_proj.0`` when E != H, ``self_cond_proj`` when E == H; ``ref(x, t,
x_self_cond)``, None = zeros) and ``mask_embedding`` (a parameter [E] the forward
does not use).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

__all__ = [
    "TorchDiffuSeq",
    "timestep_embedding",
    "rescale_timesteps",
    "torch_state_from_numpy",
    "load_numpy_state",
    "numpy_state_from_torch",
    "expected_state_keys",
]


def _cfg(cfg, name, default=None):
    v = getattr(cfg, name, default)
    return default if v is None else v


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiffuSeq/guided-diffusion sinusoidal embedding: cat[cos, sin], zero pad if odd.
    Computed in t's dtype when t is floating (float64 for gradient checks)."""
    # Computed in float64 and rounded once, as dlmone's C core does: a float32 exp
    # (torch's) is an ulp off in some frequencies, which at t ~ 1000 moves the angle
    # by ~1e-4 -- harmless for a model, too much for a 1e-5 parity test.
    dtype = t.dtype if t.is_floating_point() else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t[:, None].to(torch.float64) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def rescale_timesteps(t, diffusion_steps: int) -> torch.Tensor:
    """SPEC §4: the network sees t * 1000 / T (as a float)."""
    t = torch.as_tensor(np.asarray(t))
    return t.to(torch.float32) * (1000.0 / diffusion_steps)


# --- BERT encoder (post-LN), named like transformers.models.bert ---------------


class _SelfAttention(nn.Module):
    def __init__(self, H, A, p):
        super().__init__()
        self.num_heads = A
        self.head_dim = H // A
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.dropout = nn.Dropout(p)

    def forward(self, h):
        B, L, H = h.shape
        A, d = self.num_heads, self.head_dim

        def split(z):
            return z.view(B, L, A, d).transpose(1, 2)  # [B,A,L,d]

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # no attention mask
        probs = self.dropout(torch.softmax(scores, dim=-1))
        ctx = probs @ v  # [B,A,L,d]
        return ctx.transpose(1, 2).reshape(B, L, H)


class _SelfOutput(nn.Module):
    def __init__(self, H, p, eps):
        super().__init__()
        self.dense = nn.Linear(H, H)
        self.LayerNorm = nn.LayerNorm(H, eps=eps)
        self.dropout = nn.Dropout(p)

    def forward(self, ctx, residual):
        return self.LayerNorm(self.dropout(self.dense(ctx)) + residual)


class _Attention(nn.Module):
    def __init__(self, H, A, p, eps):
        super().__init__()
        self.self = _SelfAttention(H, A, p)
        self.output = _SelfOutput(H, p, eps)

    def forward(self, h):
        return self.output(self.self(h), h)


class _Intermediate(nn.Module):
    def __init__(self, H, Fd):
        super().__init__()
        self.dense = nn.Linear(H, Fd)

    def forward(self, h):
        return F.gelu(self.dense(h))  # erf form (approximate='none')


class _Output(nn.Module):
    def __init__(self, Fd, H, p, eps):
        super().__init__()
        self.dense = nn.Linear(Fd, H)
        self.LayerNorm = nn.LayerNorm(H, eps=eps)
        self.dropout = nn.Dropout(p)

    def forward(self, inter, residual):
        return self.LayerNorm(self.dropout(self.dense(inter)) + residual)


class _Layer(nn.Module):
    def __init__(self, H, A, Fd, p, eps):
        super().__init__()
        self.attention = _Attention(H, A, p, eps)
        self.intermediate = _Intermediate(H, Fd)
        self.output = _Output(Fd, H, p, eps)

    def forward(self, h):
        a = self.attention(h)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, N, H, A, Fd, p, eps):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(H, A, Fd, p, eps) for _ in range(N)])

    def forward(self, h):
        for layer in self.layer:
            h = layer(h)
        return h


# --- TransformerNetModel ------------------------------------------------------


class TorchDiffuSeq(nn.Module):
    """DiffuSeq's TransformerNetModel, x0-parameterised (SPEC §3)."""

    def __init__(self, cfg):
        super().__init__()
        V, E, H = cfg.vocab_size, cfg.emb_dim, cfg.hidden_dim
        N, A, Fd = cfg.num_layers, cfg.num_heads, cfg.ffn_dim
        Dt = _cfg(cfg, "time_dim", E)
        p = float(_cfg(cfg, "dropout", 0.0))
        eps = float(_cfg(cfg, "layer_norm_eps", 1e-12))
        Lmax = int(_cfg(cfg, "max_positions", cfg.seq_len))
        if H % A:
            raise ValueError("hidden_dim must be divisible by num_heads")
        self.vocab_size, self.emb_dim, self.hidden_dim, self.time_dim = V, E, H, Dt
        self.max_positions = Lmax
        self.diffusion_steps = int(_cfg(cfg, "diffusion_steps", 2000))

        self.word_embedding = nn.Embedding(V, E)
        self.lm_head = nn.Linear(E, V)
        self.lm_head.weight = self.word_embedding.weight  # tied, as in DiffuSeq
        self.time_embed = nn.Sequential(nn.Linear(Dt, 4 * Dt), nn.SiLU(), nn.Linear(4 * Dt, H))
        self.self_conditioning = bool(_cfg(cfg, "self_conditioning", False))
        E_in = 2 * E if self.self_conditioning else E
        if E != H:
            self.input_up_proj = nn.Sequential(nn.Linear(E_in, H), nn.Tanh(), nn.Linear(H, H))
        elif self.self_conditioning:
            self.self_cond_proj = nn.Linear(E_in, H)
        self.input_transformers = _Encoder(N, H, A, Fd, p, eps)
        self.position_embeddings = nn.Embedding(Lmax, H)
        self.LayerNorm = nn.LayerNorm(H, eps=eps)
        self.dropout = nn.Dropout(p)
        if E != H:
            self.output_down_proj = nn.Sequential(nn.Linear(H, H), nn.Tanh(), nn.Linear(H, E))
        if _cfg(cfg, "mask_embedding", False):
            self.mask_embedding = nn.Parameter(torch.zeros(E))
        self.last_hidden = None

    # x: [B,L,E] float; t_scaled: [B] float (already t*1000/T); x_self_cond: [B,L,E] or None
    def forward(self, x, t_scaled, x_self_cond=None):
        B, L, E = x.shape
        if L > self.max_positions:
            raise ValueError(f"sequence length {L} > max_positions {self.max_positions}")
        emb_t = self.time_embed(timestep_embedding(t_scaled, self.time_dim))
        if self.self_conditioning:
            x = torch.cat([x, torch.zeros_like(x) if x_self_cond is None else x_self_cond], dim=-1)
        elif x_self_cond is not None:
            raise ValueError("x_self_cond given to a model without self-conditioning")
        if hasattr(self, "input_up_proj"):
            emb_x = self.input_up_proj(x)
        elif self.self_conditioning:
            emb_x = self.self_cond_proj(x)
        else:
            emb_x = x
        pos = self.position_embeddings.weight[:L]
        h = self.dropout(self.LayerNorm(pos[None] + emb_x + emb_t[:, None, :]))
        h = self.input_transformers(h)
        self.last_hidden = h
        return self.output_down_proj(h) if hasattr(self, "output_down_proj") else h

    def forward_int(self, x, t_int, x_self_cond=None):
        """forward with integer timesteps in [0, T), rescaled as in SPEC §4."""
        return self.forward(x, rescale_timesteps(t_int, self.diffusion_steps), x_self_cond)

    def get_logits(self, h):
        return self.lm_head(h)  # h @ W.T + b

    def get_embeds(self, tokens):
        return self.word_embedding(tokens)


# --- state-dict helpers -------------------------------------------------------


def expected_state_keys(cfg):
    """DiffuSeq's state-dict keys for this config, in module order."""
    E, H = cfg.emb_dim, cfg.hidden_dim
    keys = ["word_embedding.weight", "lm_head.weight", "lm_head.bias"]
    keys += [f"time_embed.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    if E != H:
        keys += [f"input_up_proj.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    elif _cfg(cfg, "self_conditioning", False):
        keys += ["self_cond_proj.weight", "self_cond_proj.bias"]
    for i in range(cfg.num_layers):
        pre = f"input_transformers.layer.{i}."
        for mod in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        ):
            keys += [pre + mod + ".weight", pre + mod + ".bias"]
    keys += ["position_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"]
    if E != H:
        keys += [f"output_down_proj.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    if _cfg(cfg, "mask_embedding", False):  # a parameter of the root module: saved first
        keys.insert(0, "mask_embedding")
    return keys


def torch_state_from_numpy(d, dtype=torch.float32):
    """{name: np.ndarray} -> {name: torch.Tensor} (copies, so later in-place
    changes on either side do not leak)."""
    return {k: torch.tensor(np.array(v), dtype=dtype) for k, v in d.items()}


def numpy_state_from_torch(model):
    """Parameters of a torch module as {name: float32 ndarray} (copies)."""
    return {k: v.detach().cpu().numpy().astype(np.float32).copy() for k, v in model.state_dict().items()}


def load_numpy_state(model, d, dtype=None):
    """Load a {name: ndarray} dict into ``model`` (strict). The tied
    ``lm_head.weight`` may be absent; if present it must equal
    ``word_embedding.weight``."""
    sd = torch_state_from_numpy(d, dtype=dtype or next(model.parameters()).dtype)
    if "lm_head.weight" in sd and "word_embedding.weight" in sd:
        if not torch.equal(sd["lm_head.weight"], sd["word_embedding.weight"]):
            raise ValueError("lm_head.weight differs from tied word_embedding.weight")
    else:
        sd.setdefault("lm_head.weight", sd["word_embedding.weight"])
    model.load_state_dict(sd, strict=True)
    return model
