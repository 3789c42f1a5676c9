"""DiT with adaLN-Zero (Peebles & Xie 2023, arXiv:2212.09748), trained as a rectified flow.

Conditions, each optional and each replaceable by a learned null for classifier-free guidance:
  y          (B,) class labels                      -> added to the adaLN conditioning vector
  text       (B, L, D_text) token embeddings, text_mask (B, L) bool (True = real token)
                                                    -> cross-attention after self-attention
  image_emb  (B, D_img) pooled image embedding      -> added to the adaLN conditioning vector
A model built with none of them is unconditional.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------
# The rectified-flow convention, stated once and used by train.py and sample.py:
#   xt = (1 - t) * x + t * noise,  t in [0, 1]: t = 0 is clean data, t = 1 is pure N(0, I) noise.
#   The network predicts the velocity v = d xt / dt = noise - x.
#   Sampling integrates d xt / dt = v from t = 1 down to t = 0 (see sample.sample_ode).


def interpolate(x, noise, t):
    """xt for clean x (B, ...), noise like x and t (B,) in [0, 1]."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return x + t * (noise - x)


def velocity_target(x, noise):
    """The velocity the network is trained to predict at every t."""
    return noise - x


def shift_time(t, shift):
    """t' = s t / (1 + (s - 1) t) (SD3, arXiv:2403.03206, eq. 23): s > 1 moves time towards noise, as
    larger images need (more pixels keep more signal at a given t). Monotone, fixes 0 and 1."""
    return t if shift == 1 else shift * t / (1 + (shift - 1) * t)


# ---------------------------------------------------------------------------------------------


@dataclass
class DiTConfig:
    in_channels: int = 1      # 1/3 for pixels, the VAE's latent channels for latents
    patch_size: int = 2       # pixels (or latent cells) per token side: 1, 2, 4 or 8
    hidden: int = 384         # model width
    depth: int = 12           # number of DiT blocks
    heads: int = 6            # attention heads; hidden must be divisible by heads
    mlp_ratio: float = 4.0    # MLP hidden = mlp_ratio * hidden
    num_classes: int = 0      # 0 = no class conditioning
    text_dim: int = 0         # width of the text encoder's token embeddings; 0 = no text
    image_dim: int = 0        # width of the pooled image embedding; 0 = no image conditioning
    qk_norm: bool = True      # RMS-normalise queries and keys per head (stabilises attention logits)
    grad_checkpoint: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    attn_impl: str = "auto"   # 'sdpa', 'math' (explicit softmax), or 'auto' (fastest per device)

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.patch_size not in (1, 2, 4, 8):
            raise ValueError(f"patch_size={self.patch_size}: expected 1, 2, 4 or 8")
        if self.attn_impl not in ("auto", "sdpa", "math"):
            raise ValueError(f"attn_impl={self.attn_impl!r}: expected 'auto', 'sdpa' or 'math'")


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of t (B,) in [0, 1], scaled by 1000 so the frequencies match DiT's."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def pos_embed_2d(h, w, dim, device):
    """Fixed 2-D sine-cosine position embedding (h*w, dim) for a grid of h x w tokens.

    Computed for the actual grid from absolute token coordinates, so images of any aspect ratio share
    one model: a 16x24 grid sees the same embedding as the top-left 16x24 of a 24x24 one.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    out = [f(c.reshape(-1, 1) * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    emb = torch.cat(out, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))  # dim not divisible by 4: zero-pad the remainder


def attention(q, k, v, mask, impl):
    """q (B, h, N, d), k/v (B, h, M, d), mask None or (B, 1, 1, M) bool (True = attend)."""
    if impl == "auto":
        # Measured on a 2-core CPU (BENCHMARKS.md): SDPA gains nothing from bf16 there, while the
        # explicit softmax product rides the fast bf16 matmul; on CUDA SDPA uses fused kernels.
        impl = "math" if q.device.type == "cpu" and q.dtype == torch.bfloat16 else "sdpa"
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class RMSNorm(nn.Module):
    """RMS norm computed in the input's dtype (nn.RMSNorm warns and falls back under autocast)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, x.shape[-1:], self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    """Multi-head attention; self-attention when `ctx` is None, else cross-attention to ctx."""

    def __init__(self, dim, heads, qk_norm, impl):
        super().__init__()
        self.heads, self.impl = heads, impl
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx=None, mask=None):
        B, N, D = x.shape
        ctx = x if ctx is None else ctx
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)                 # (B, h, N, d)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = attention(self.q_norm(q), self.k_norm(k), v, mask, self.impl)      # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.hidden
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, cfg.heads, cfg.qk_norm, cfg.attn_impl)
        if cfg.text_dim:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross = Attention(dim, cfg.heads, cfg.qk_norm, cfg.attn_impl)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, ctx, ctx_mask):
        # x (B, N, D) tokens, c (B, D) conditioning vector, ctx (B, L, D) projected text or None
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        if ctx is not None:
            x = x + self.cross(self.norm_cross(x), ctx, ctx_mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p, C = cfg.hidden, cfg.patch_size, cfg.in_channels
        self.patch_embed = nn.Conv2d(C, D, kernel_size=p, stride=p)
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        if cfg.num_classes:
            self.y_embed = nn.Embedding(cfg.num_classes + 1, D)   # index num_classes is the null label
        if cfg.text_dim:
            self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
            self.null_text = nn.Parameter(torch.randn(1, D) * 0.02)   # one learned token for "no text"
        if cfg.image_dim:
            self.image_proj = nn.Sequential(nn.Linear(cfg.image_dim, D), nn.SiLU(), nn.Linear(D, D))
            self.null_image = nn.Parameter(torch.randn(D) * 0.02)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.out = nn.Linear(D, p * p * C)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.t_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        if self.cfg.num_classes:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        # adaLN-Zero: every residual branch starts closed and the output starts at zero, so the
        # network is the identity map at initialisation. Cross-attention has no gate; its output
        # projection starts at zero for the same reason.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
            if self.cfg.text_dim:
                nn.init.zeros_(block.cross.proj.weight)
        for m in (self.adaLN_out[-1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, xt, t, y=None, text=None, text_mask=None, image_emb=None,
                drop_y=None, drop_text=None, drop_image=None):
        """Velocity v (B, C, H, W) for xt (B, C, H, W) at times t (B,).

        A condition that the model has but that is None, or whose drop_* flag (B,) bool is True for a
        sample, is replaced by its learned null: that is the unconditional branch of guidance.
        """
        cfg, B = self.cfg, xt.shape[0]
        p, (H, W) = cfg.patch_size, xt.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not divisible by patch_size={p}")
        h, w = H // p, W // p
        x = self.patch_embed(xt).flatten(2).transpose(1, 2)                        # (B, h*w, D)
        x = x + pos_embed_2d(h, w, cfg.hidden, xt.device).to(x.dtype)
        c = self.t_embed(timestep_embedding(t, 256))                                # (B, D)
        no = torch.ones(B, dtype=torch.bool, device=xt.device)
        if cfg.num_classes:
            drop = no if y is None else drop_y
            y = torch.zeros(B, dtype=torch.long, device=xt.device) if y is None else y
            if drop is not None:
                y = torch.where(drop, cfg.num_classes, y)
            c = c + self.y_embed(y)
        if cfg.image_dim:
            drop = no if image_emb is None else drop_image
            img = self.null_image.expand(B, -1) if image_emb is None else self.image_proj(image_emb)
            if drop is not None:
                img = torch.where(drop[:, None], self.null_image.to(img.dtype), img)
            c = c + img
        ctx = ctx_mask = None
        if cfg.text_dim:
            # A dropped caption becomes one valid null token followed by masked padding.
            if text is None:
                text = torch.zeros(B, 1, cfg.text_dim, device=xt.device)
                text_mask, drop_text = None, no
            ctx = self.text_proj(text)                                              # (B, L, D)
            mask = torch.ones(ctx.shape[:2], dtype=torch.bool, device=xt.device) if text_mask is None else text_mask
            if drop_text is not None:
                first = torch.zeros_like(mask)
                first[:, 0] = True
                ctx = torch.where((drop_text[:, None] & first)[..., None], self.null_text.to(ctx.dtype), ctx)
                mask = torch.where(drop_text[:, None], first, mask)
            # a sample whose mask is all False would give NaN attention: let it see its first token
            mask = mask.clone()
            mask[:, 0] |= ~mask.any(dim=1)
            ctx_mask = mask[:, None, None, :]                                       # (B, 1, 1, L)
        for block in self.blocks:
            if cfg.grad_checkpoint and self.training:
                x = checkpoint(block, x, c, ctx, ctx_mask, use_reentrant=False)
            else:
                x = block(x, c, ctx, ctx_mask)
        shift, scale = self.adaLN_out(c).unsqueeze(1).chunk(2, dim=-1)
        x = self.out(modulate(self.norm_out(x), shift, scale))                     # (B, h*w, p*p*C)
        x = x.view(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)                     # (B, C, h, p, w, p)
        return x.reshape(B, -1, H, W)

    def flops_per_image(self, height, width, text_len=0):
        """Forward FLOPs (2 per multiply-add) of the matmuls for one image of height x width inputs.

        Counts linear layers and attention products; norms, activations and embeddings are ignored
        (under 1% at these sizes). Training costs about 3x this (forward + backward).
        """
        cfg = self.cfg
        D, p, C = cfg.hidden, cfg.patch_size, cfg.in_channels
        N = (height // p) * (width // p)
        M = int(cfg.mlp_ratio * D)
        L = text_len if cfg.text_dim else 0
        per_block = (2 * N * D * 3 * D          # q, k, v
                     + 2 * 2 * N * N * D        # scores and weighted sum
                     + 2 * N * D * D            # output projection
                     + 2 * 2 * N * D * M        # MLP
                     + 2 * D * 6 * D)           # adaLN modulation
        if L:
            per_block += 2 * N * D * D + 2 * L * D * 2 * D + 2 * 2 * N * L * D + 2 * N * D * D
        flops = cfg.depth * per_block
        flops += 2 * N * C * p * p * D + 2 * N * D * p * p * C + 2 * D * 2 * D   # patchify, output
        flops += 2 * 256 * D + 2 * D * D                                         # timestep MLP
        if L:
            flops += 2 * L * (cfg.text_dim * D + D * D)
        if cfg.image_dim:
            flops += 2 * (cfg.image_dim * D + D * D)
        return flops
