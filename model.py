"""DiT with adaLN-Zero (Peebles & Xie 2023, arXiv:2212.09748), trained as a rectified flow.

Conditions, each optional and each replaceable by a learned null for classifier-free guidance:
  y          (B,) class labels                      -> added to the adaLN conditioning vector
  text       (B, L, D_text) token embeddings, text_mask (B, L) bool (True = real token)
                                                    -> cross-attention after self-attention
  image_emb  (B, D_img) pooled image embedding      -> added to the adaLN conditioning vector
A model built with none of them is unconditional.
"""
import ctypes
import math
import os
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


X_PRED_MIN_T = 0.05   # an x-predicting model's loss divides by max(t, this) (flow_loss): bounded near t = 0
X_PRED_T_EPS = 1e-6   # its velocity divides by max(t, this): finite at t = 0


def velocity_from_x(xt, x_hat, t):
    """The velocity implied by a clean-image estimate x_hat at xt, t (B,): v = (xt - x_hat) / t, exact for every
    t > 0 (a sampler's last steps may come below X_PRED_MIN_T); t = 0 itself, where it is undefined, gives a finite
    number so that training never sees an inf."""
    t = t.float().clamp(min=X_PRED_T_EPS).view(-1, *([1] * (xt.dim() - 1)))
    return (xt.float() - x_hat.float()) / t


def flow_loss(v, x, noise, t, prediction):
    """Per-sample mean squared error (B,) of a predicted velocity v at t against the rectified-flow target.
    An x-predicting model's velocity (xt - x_hat) / t enters as (xt - x_hat) / max(t, X_PRED_MIN_T): its image
    error weighs 1 / t^2, capped below X_PRED_MIN_T, where the loss pulls x_hat a little past x (away from the
    noise). A loss whose target stays x there scored worse with 32 sampling steps (BENCHMARKS.md, round 5)."""
    v = v.float()
    if prediction == "x":
        t = t.float().view(-1, *([1] * (v.dim() - 1)))
        v = torch.where(t < X_PRED_MIN_T, v * (t.clamp(min=X_PRED_T_EPS) / X_PRED_MIN_T), v)
    return (v - velocity_target(x, noise)).pow(2).mean(dim=tuple(range(1, v.dim())))


def shift_time(t, shift):
    """t' = s t / (1 + (s - 1) t) (SD3, arXiv:2403.03206, eq. 23): s > 1 moves time towards noise, as
    larger images need (more pixels keep more signal at a given t). Monotone, fixes 0 and 1."""
    return t if shift == 1 else shift * t / (1 + (shift - 1) * t)


T_SAMPLING = ("logit_normal", "uniform")   # how training draws t: SD3's logit-normal, or uniform


class TrainingDraws:
    """Each training sample's own timestep, noise and guidance-dropout draw, keyed by (seed, sample id): the
    same whatever the batch, rank or accumulation step the sample lands in, so DDP equals one process and a
    resume repeats them. Called by the data stream (data.ShardStream(draws=...)), so that with loader
    processes the draws run beside the training step, and on a GPU they arrive with the batch in one copy
    instead of as a few small kernels per sample. Drawn on the CPU: the streams do not depend on the device.
    A plain object of numbers, so that spawned loader processes can unpickle it."""

    def __init__(self, seed=0, t_sampling="logit_normal", t_loc=0.0, t_scale=1.0, t_shift=1.0):
        if t_sampling not in T_SAMPLING:
            raise ValueError(f"t_sampling={t_sampling!r}: expected one of {', '.join(map(repr, T_SAMPLING))}")
        self.seed, self.t_sampling, self.t_loc, self.t_scale, self.t_shift = seed, t_sampling, t_loc, t_scale, t_shift

    def __call__(self, sid, shape):
        """{'t': (B,), 'noise': (B, *shape), 'u': (B,) uniform for the dropout masks} for sample ids sid (B,)."""
        gen, t, noise, u = torch.Generator(), [], [], []
        for s in sid.tolist():
            gen.manual_seed(self.seed * 1_000_003 + s)
            noise.append(torch.randn(shape, generator=gen))
            z = torch.randn(1, generator=gen)
            uu = torch.rand(2, generator=gen)
            t.append(torch.sigmoid(self.t_loc + self.t_scale * z) if self.t_sampling == "logit_normal" else uu[1:])
            u.append(uu[:1])
        return {"t": shift_time(torch.cat(t), self.t_shift), "noise": torch.stack(noise), "u": torch.cat(u)}

    @staticmethod
    def dropout(u, p_uncond, p_text_only, p_image_only):
        """Guidance dropout from the one categorical draw u (B,): masks (drop_all, drop_text, drop_image), (B,) bool
        each. With p_uncond every condition is dropped, with p_text_only the image (text and class kept), with
        p_image_only the text (image kept)."""
        drop_all = u < p_uncond
        drop_image = drop_all | ((u >= p_uncond) & (u < p_uncond + p_text_only))
        drop_text = drop_all | ((u >= p_uncond + p_text_only) & (u < p_uncond + p_text_only + p_image_only))
        return drop_all, drop_text, drop_image


# ---------------------------------------------------------------------------------------------


# the erf GELU op costs 2.5x less than the tanh approximation on CPUs, 1.03x on the quick-start step (BENCHMARKS.md)
MLP_ACTS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}
# DiTConfig fields added after checkpoints were first written, with the value those checkpoints meant
LEGACY_MODEL_ARGS = {"mlp_act": "gelu_tanh", "prediction": "v", "loss_weighting": False, "image_norm": False,
                     "text_norm": False, "image_stats": False, "repa_depth": 0}


def config_from_checkpoint(model_args):
    """DiTConfig for a checkpoint's model_args, filling fields it predates with what it was trained with."""
    return DiTConfig(**{**LEGACY_MODEL_ARGS, **model_args})


@dataclass
class DiTConfig:
    in_channels: int = 1      # 1/3 for pixels, the VAE's latent channels for latents
    patch_size: int = 2       # pixels (or latent cells) per token side: 1, 2, 4 or 8
    hidden: int = 384         # model width
    depth: int = 12           # number of DiT blocks
    heads: int = 6            # attention heads; hidden must be divisible by heads
    mlp_ratio: float = 4.0    # MLP hidden = mlp_ratio * hidden
    num_classes: int = 0      # 0 = no class conditioning
    class_embed_std: float = 0.02  # std of the class embedding table at initialisation (DiT's 0.02)
    text_dim: int = 0         # width of the text encoder's token embeddings; 0 = no text
    image_dim: int = 0        # width of the pooled image embedding; 0 = no image conditioning
    image_stats: bool = True  # first standardise each feature of the embedding by the train split's mean and std
                              # (buffers image_mean, image_std; train.py sets them from the data)
    image_norm: bool = True   # centre the image embedding and scale it to unit length before its projection
    image_tokens: int = 0     # also give the image embedding to cross-attention as this many context tokens beside
                              # the caption's (IP-Adapter, arXiv:2308.06721); needs text_dim; 0 = adaLN only
    text_norm: bool = True    # the same for each of the caption's token embeddings
    text_layers: int = 0      # transformer blocks over the caption's tokens before cross-attention (a caption
                              # refiner, as Lumina-Next's), so that a word's token can take in the words around it
    qk_norm: bool = True      # RMS-normalise queries and keys per head (stabilises attention logits)
    grad_checkpoint: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    attn_impl: str = "auto"   # 'sdpa', 'math' (explicit softmax), or 'auto' (fastest per device)
    mlp_act: str = "gelu"     # MLP activation: 'gelu' (erf), 'gelu_tanh' (DiT's), 'silu'
    moe_experts: int = 0      # MLP experts per block; 0 = the dense MLP
    moe_top_k: int = 2        # experts each token is routed to (token choice)
    moe_capacity: float = 1.25  # expert capacity = ceil(capacity * tokens * top_k / experts); 0 = no limit
    moe_shared_expert: bool = False  # also one always-on dense MLP of the same width (DeepSeekMoE)
    loss_weighting: bool = False  # also learn log u(t), the expected loss at t, for train.py's objective
                              # L / u(t) + log u(t) (EDM2's uncertainty weighting, arXiv:2312.02696)
    repa_depth: int = 0       # REPA (arXiv:2410.06940): in training, a head reads the clean image's embedding
                              # from the tokens after this many blocks (train.py adds 1 - cosine to the loss);
                              # 0 = off. Needs image_dim
    prediction: str = "v"     # what the last layer outputs: 'v' (velocity) or 'x' (clean image, turned into
                              # the velocity (xt - x) / t, so callers always get v; JiT, arXiv:2511.13720)

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.patch_size not in (1, 2, 4, 8):
            raise ValueError(f"patch_size={self.patch_size}: expected 1, 2, 4 or 8")
        if self.attn_impl not in ("auto", "sdpa", "math"):
            raise ValueError(f"attn_impl={self.attn_impl!r}: expected 'auto', 'sdpa' or 'math'")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"mlp_act={self.mlp_act!r}: expected one of {', '.join(MLP_ACTS)}")
        if self.prediction not in ("v", "x"):
            raise ValueError(f"prediction={self.prediction!r}: expected 'v' or 'x'")
        if self.moe_experts < 0 or (self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts):
            raise ValueError(f"moe_experts={self.moe_experts}, moe_top_k={self.moe_top_k}: need 0 experts, or "
                             f"1 <= top_k <= experts")
        if not self.class_embed_std > 0:
            raise ValueError(f"class_embed_std={self.class_embed_std} must be > 0")
        if self.moe_capacity < 0:
            raise ValueError(f"moe_capacity={self.moe_capacity} must be >= 0 (0 = no limit)")
        if self.image_tokens < 0 or self.image_tokens and not (self.image_dim and self.text_dim):
            raise ValueError(f"image_tokens={self.image_tokens}: needs image_dim > 0 and text_dim > 0 (the tokens "
                             f"join the caption's in cross-attention); image_dim={self.image_dim}, "
                             f"text_dim={self.text_dim}")
        if not 0 <= self.repa_depth <= self.depth or self.repa_depth and not self.image_dim:
            raise ValueError(f"repa_depth={self.repa_depth}: expected 0 (off) or 1..depth={self.depth} with "
                             f"image_dim > 0 (the embedding it predicts); image_dim={self.image_dim}")
        if self.text_layers < 0 or self.text_layers and not self.text_dim:
            raise ValueError(f"text_layers={self.text_layers}: needs text_dim > 0 (a caption to refine); "
                             f"text_dim={self.text_dim}")


def compile_model(model, log=print):
    """torch.compile(model); on a CPU with no C++ compiler for inductor, the model itself and a message
    (inductor's CPU kernels are C++: without a compiler the first call would fail deep inside it)."""
    if next(model.parameters()).device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
        except Exception as e:
            log(f"compile=True: no C++ compiler for torch.compile on the CPU ({type(e).__name__}: {str(e)[:120]}); "
                "running eager (install g++ or clang++, or set CXX, for the compiled model)")
            return model
    return torch.compile(model)


def bf16_is_native(device_type):
    """True where this process runs bf16 matmuls natively: a CUDA GPU with bf16, or a CPU with avx512_bf16 whose
    AVX-512 kernels it may use. ATEN_CPU_CAPABILITY=avx2 or ONEDNN_MAX_CPU_ISA=AVX2, which make a process run the
    code of a CPU without AVX-512, take that away: oneDNN then emulates bf16, far slower than fp32 (BENCHMARKS.md
    round 15). On CUDA, is_bf16_supported() alone also counts the emulation that pre-Ampere GPUs (T4, V100) run,
    slower than fp32 and with attention on the math kernel; a torch without `including_emulation`
    gets the same answer from the compute capability (bf16 matmuls are native from 8.0, Ampere)."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            return torch.version.hip is not None or torch.cuda.get_device_capability()[0] >= 8
    if device_type != "cpu" or not torch.cpu._is_avx512_bf16_supported():
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()   # oneDNN's names: AVX2, AVX512_CORE_BF16, ...
    onednn_bf16 = isa in ("ALL", "DEFAULT") or any(k in isa for k in ("BF16", "AMX", "AVX10"))
    return onednn_bf16 and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def keep_freed_cpu_memory(largest=32 << 20):
    """Have glibc's malloc keep the memory that freed tensors leave, for the next step to reuse, instead of
    handing it back to the OS and taking every page again through a page fault (zero-filled) a step later.

    By default glibc maps each block above a threshold (128 KiB, raised as such blocks are freed) with mmap and
    returns free memory above 2x that from the top of the heap. A training step frees and reallocates the same
    activation buffers every step, so it paid ~25,000 page faults per step in the small recipe on a CPU.
    Here blocks up to `largest` (glibc's limit: 32 MiB on 64-bit) come from the heap and the heap is never
    trimmed; the process keeps its peak heap, which the next step needs again anyway. Speed: BENCHMARKS.md.
    Returns True where it applied (Linux with glibc), False elsewhere (macOS, Windows, musl), where nothing
    changes. CUDA memory has its own caching allocator and is not affected."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return mallopt(M_MMAP_THRESHOLD, largest) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def modulate(x, shift, scale):
    """x * (1 + scale) + shift, as one op over the tokens (addcmul) instead of two."""
    return torch.addcmul(shift, x, 1 + scale)


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
        # F.rms_norm's own formula (normalised in float, then cast back and scaled), which on a CPU it also runs
        # op by op, but with x * x for its pow(x, 2): pow's backward costs several times a product's there
        xf = x.float()
        return (xf * torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


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
        # Heads are split as views: (B, N, h, d) normalised over d where d is contiguous, then (B, h, N, d) for
        # attention. On a CPU, normalising the transposed views instead, or taking k and v from one permuted 5-D
        # view, made the backward run strided copies and reductions: a QK-normed step ran 1.15x slower.
        k, v = (t.view(B, ctx.shape[1], self.heads, -1) for t in self.kv(ctx).chunk(2, dim=-1))
        q = self.q_norm(self.q(x).view(B, N, self.heads, -1)).transpose(1, 2)    # (B, h, N, d)
        k, v = self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        out = attention(q, k, v, mask, self.impl)                                  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


def mlp(cfg):
    dim = cfg.hidden
    return nn.Sequential(nn.Linear(dim, int(dim * cfg.mlp_ratio)), MLP_ACTS[cfg.mlp_act](),
                         nn.Linear(int(dim * cfg.mlp_ratio), dim))


class MoE(nn.Module):
    """Mixture-of-experts MLP with token-choice top-k routing (Switch Transformer, arXiv:2101.03961;
    top-k weights renormalised as in Mixtral). Each expert takes at most `capacity` of the (token,
    choice) assignments, first choices before second ones and tokens in order; the rest are dropped
    (the token keeps its residual). After each forward, `aux_loss` holds the load-balancing loss
    E * sum_e f_e * P_e (1 at uniform routing: f_e the fraction of assignments to expert e, P_e its mean
    router probability), `dropped` the fraction of assignments over capacity and `load` (E,) the f_e."""

    def __init__(self, cfg):
        super().__init__()
        E, D, M = cfg.moe_experts, cfg.hidden, int(cfg.hidden * cfg.mlp_ratio)
        self.top_k, self.capacity, self.act = cfg.moe_top_k, cfg.moe_capacity, MLP_ACTS[cfg.mlp_act]()
        self.router = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, D, M))
        self.b1 = nn.Parameter(torch.zeros(E, M))
        self.w2 = nn.Parameter(torch.empty(E, M, D))
        self.b2 = nn.Parameter(torch.zeros(E, D))
        with torch.no_grad():   # each expert initialised like the dense MLP's nn.Linear
            for w in (self.w1, self.w2):
                for e in range(E):
                    nn.init.xavier_uniform_(w[e].T)
        self.shared = mlp(cfg) if cfg.moe_shared_expert else None

    def forward(self, x):
        shape, E = x.shape, self.w1.shape[0]
        x = x.reshape(-1, shape[-1])                                            # (T, D)
        T = x.shape[0]
        probs = self.router(x).float().softmax(dim=-1)                          # (T, E)
        top_p, top_e = probs.topk(self.top_k, dim=-1)                           # (T, k)
        gates = (top_p / top_p.sum(dim=-1, keepdim=True)).to(x.dtype)
        # assignments ordered choice-major (every token's 1st choice, then 2nd, ...), so capacity drops
        # the lower choices first; pos = the assignment's place in its expert's queue
        expert = top_e.T.reshape(-1)                                            # (k T,)
        one_hot = F.one_hot(expert, E)
        pos = ((one_hot.cumsum(dim=0) - 1) * one_hot).sum(dim=1)
        cap = math.ceil(self.capacity * T * self.top_k / E) if self.capacity else T
        keep = pos < cap
        token = torch.arange(T, device=x.device).repeat(self.top_k)
        gate = gates.T.reshape(-1)
        out = torch.zeros_like(x)
        for e in range(E):
            sel = torch.nonzero(keep & (expert == e)).squeeze(1)
            tok = token[sel]
            h = self.act(torch.addmm(self.b1[e], x[tok], self.w1[e]))
            out.index_add_(0, tok, torch.addmm(self.b2[e], h, self.w2[e]) * gate[sel, None])
        if self.shared is not None:
            out = out + self.shared(x)
        load = one_hot.float().mean(dim=0)                                      # f_e, before capacity
        self.aux_loss = E * (load * probs.mean(dim=0)).sum()
        self.dropped = 1 - keep.float().mean()
        self.load = load.detach()
        return out.reshape(shape)


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
        self.mlp = MoE(cfg) if cfg.moe_experts else mlp(cfg)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, ctx, ctx_mask):
        # x (B, N, D) tokens, c (B, D) conditioning vector, ctx (B, L, D) projected text or None
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).unsqueeze(1).chunk(6, dim=-1)
        x = torch.addcmul(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1)))    # x + gate1 * attn
        if ctx is not None:
            x = x + self.cross(self.norm_cross(x), ctx, ctx_mask)
        return torch.addcmul(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))  # x + gate2 * mlp


class TextBlock(nn.Module):
    """A pre-norm transformer block over the caption's tokens (self-attention, then the MLP), unconditioned."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.attn = Attention(cfg.hidden, cfg.heads, cfg.qk_norm, cfg.attn_impl)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=1e-6)
        self.mlp = mlp(cfg)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class ClassLookup(torch.autograd.Function):
    """table[y] (B, D) for a table (n, D) and labels y (B,): an index, so the rows come out exact on every device
    and in every dtype (a one-hot matmul would run in TF32 where train.py allows it, and in bf16 under autocast).
    The backward is the one-hot matmul one_hot(y)^T @ grad, not the lookup's own scatter-add: inductor compiles
    that for the CPU with atomic adds from several threads, so runs would differ in the last bits. Where TF32 is
    allowed, this gradient rounds as every other weight gradient of the network does."""

    @staticmethod
    def forward(ctx, table, y):
        ctx.save_for_backward(y)
        ctx.rows = table.shape[0]
        return table[y]

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        return F.one_hot(y, ctx.rows).to(grad.dtype).t().mm(grad), None


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
            if cfg.image_stats:   # the identity until train.py sets them; saved with the weights
                self.register_buffer("image_mean", torch.zeros(cfg.image_dim))
                self.register_buffer("image_std", torch.ones(cfg.image_dim))
        if cfg.image_tokens:
            self.image_ctx = nn.Linear(cfg.image_dim, cfg.image_tokens * D)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.text_blocks = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.text_layers))   # empty: no parameters
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.out = nn.Linear(D, p * p * C)
        if cfg.repa_depth:   # REPA's projector, from the tokens average-pooled to 2x2 (so a pair keeps its sides)
            self.repa_head = nn.Sequential(nn.Linear(4 * D, 2 * D), nn.SiLU(), nn.Linear(2 * D, cfg.image_dim))
        self._init_weights()
        if cfg.loss_weighting:   # log u(t) from the timestep features, for train.py; made after the init above,
            self.loss_logvar = nn.Linear(256, 1)    # so that the network's own weights start as without it
            nn.init.zeros_(self.loss_logvar.weight)  # u = 1: the objective starts as the plain loss
            nn.init.zeros_(self.loss_logvar.bias)

    @torch.no_grad()
    def set_image_stats(self, mean, std):
        """image_stats: the embedding's per-feature mean and std over the train split (data.image_emb_stats)."""
        self.image_mean.copy_(mean)
        self.image_std.copy_(std)

    def class_embedding(self, y):
        """self.y_embed(y): the rows of the table, exactly (ClassLookup)."""
        return ClassLookup.apply(self.y_embed.weight, y)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.t_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        if self.cfg.num_classes:
            nn.init.normal_(self.y_embed.weight, std=self.cfg.class_embed_std)
        # adaLN-Zero: every residual branch starts closed and the output starts at zero, so the
        # network is the identity map at initialisation. Cross-attention has no gate; its output
        # projection starts at zero for the same reason.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
            if self.cfg.text_dim:
                nn.init.zeros_(block.cross.proj.weight)
        for block in self.text_blocks:   # each starts as the identity
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp[-1].weight)
        for m in (self.adaLN_out[-1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def num_params(self, active=False):
        """Parameters in all; with active=True, those one token uses (top_k of each block's experts)."""
        n = sum(p.numel() for p in self.parameters())
        cfg = self.cfg
        if active and cfg.moe_experts:
            per_expert = sum(p[0].numel() for p in (self.blocks[0].mlp.w1, self.blocks[0].mlp.b1,
                                                     self.blocks[0].mlp.w2, self.blocks[0].mlp.b2))
            n -= cfg.depth * (cfg.moe_experts - cfg.moe_top_k) * per_expert
        return n

    def conditions(self, batch):
        """The forward's condition arguments from a data batch (data.ShardStream's keys); None for conditions this
        model does not use."""
        cfg = self.cfg
        return dict(y=batch.get("y") if cfg.num_classes else None,
                    text=batch.get("text") if cfg.text_dim else None,
                    text_mask=batch.get("text_mask") if cfg.text_dim else None,
                    image_emb=batch.get("image_emb") if cfg.image_dim else None)

    def moe_stats(self):
        """From the last forward of an MoE model: (load-balancing loss summed over blocks, fraction of
        assignments dropped over capacity (mean over blocks), per-expert load (depth, E)); None if dense."""
        if not self.cfg.moe_experts:
            return None
        moes = [block.mlp for block in self.blocks]
        return (sum(m.aux_loss for m in moes), torch.stack([m.dropped for m in moes]).mean(),
                torch.stack([m.load for m in moes]))

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
        # contiguous: the transposed view would give the whole residual stream a (B, D, N) memory layout,
        # and every LayerNorm would copy it, forward and backward
        x = self.patch_embed(xt).flatten(2).transpose(1, 2).contiguous()           # (B, h*w, D)
        x = x + pos_embed_2d(h, w, cfg.hidden, xt.device).to(x.dtype)
        t_features = timestep_embedding(t, 256)
        c = self.t_embed(t_features)                                                # (B, D)
        if cfg.loss_weighting and self.training:
            # computed inside forward (as MoE's aux_loss), so that FSDP has the weights gathered for it
            self.loss_logvar_t = self.loss_logvar(t_features).squeeze(1).float()  # (B,) log u(t)
        no = torch.ones(B, dtype=torch.bool, device=xt.device)
        repa_target = None   # REPA's: the clean image's standardised embedding, whether or not it conditions
        if cfg.num_classes:
            drop = no if y is None else drop_y
            y = torch.zeros(B, dtype=torch.long, device=xt.device) if y is None else y
            if drop is not None:
                y = torch.where(drop, cfg.num_classes, y)
            c = c + self.class_embedding(y)
        if cfg.image_dim:
            drop = no if image_emb is None else drop_image
            if image_emb is not None and cfg.image_stats:
                # A feature's mean over the data says nothing of the image, yet Lite0's means hold 70% of an
                # embedding's squared length after image_norm; standardised, every feature varies alike and
                # image adherence rises (BENCHMARKS.md, round 32)
                image_emb = (image_emb - self.image_mean) / self.image_std
            repa_target = image_emb
            if image_emb is not None and cfg.image_norm:
                # Adam moves each weight of the projection by ~lr a step, so its output by ~lr x the input's L1
                # norm: unit length keeps that O(lr) for any encoder's width and scale (a raw 896-d embedding of
                # rms 5 was never learned; BENCHMARKS.md, round 22)
                image_emb = F.layer_norm(image_emb, image_emb.shape[-1:]) / math.sqrt(image_emb.shape[-1])
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
            if cfg.text_norm:   # as image_norm: MiniLM's 384-d tokens raw, pairs of digits were read 3x less often
                text = F.layer_norm(text, text.shape[-1:]) / math.sqrt(text.shape[-1])   # (BENCHMARKS.md, round 23)
            ctx = self.text_proj(text)                                              # (B, L, D)
            mask = torch.ones(ctx.shape[:2], dtype=torch.bool, device=xt.device) if text_mask is None else text_mask
            for block in self.text_blocks:
                ctx = block(ctx, mask[:, None, None, :])
            if drop_text is not None:
                first = (torch.arange(mask.shape[1], device=mask.device) == 0).expand_as(mask)
                ctx = torch.where((drop_text[:, None] & first)[..., None], self.null_text.to(ctx.dtype), ctx)
                mask = drop_text[:, None] & first | ~drop_text[:, None] & mask
            if cfg.image_tokens and image_emb is not None:   # the image's K tokens, masked out where it is dropped
                keep = (no if drop_image is None else ~drop_image)[:, None].expand(B, cfg.image_tokens)
                img_ctx = self.image_ctx(image_emb).view(B, cfg.image_tokens, -1)
                ctx, mask = torch.cat([ctx, img_ctx.to(ctx.dtype)], 1), torch.cat([mask, keep], 1)
            # a sample whose mask is all False would give NaN attention: let it see its first token. The mask
            # ops here are out of place, and no bool where: the ONNX export (sample.py) needs both
            mask = mask | (torch.arange(mask.shape[1], device=mask.device) == 0) & ~mask.any(dim=1, keepdim=True)
            ctx_mask = mask[:, None, None, :]                                       # (B, 1, 1, L)
        if self.training:   # (never in eval: the ONNX export cannot trace an attribute set in forward)
            self.repa_loss_t = None
        for i, block in enumerate(self.blocks):
            if cfg.grad_checkpoint and self.training:
                x = checkpoint(block, x, c, ctx, ctx_mask, use_reentrant=False)
            else:
                x = block(x, c, ctx, ctx_mask)
            if i + 1 == cfg.repa_depth and self.training and repa_target is not None:   # (B,), for train.py
                pooled = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(B, -1, h, w), 2).flatten(1)   # (B, 4D)
                self.repa_loss_t = 1 - F.cosine_similarity(self.repa_head(pooled).float(), repa_target.float(), dim=-1)
        shift, scale = self.adaLN_out(c).unsqueeze(1).chunk(2, dim=-1)
        x = self.out(modulate(self.norm_out(x), shift, scale))                     # (B, h*w, p*p*C)
        x = x.view(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)                     # (B, C, h, p, w, p)
        x = x.reshape(B, -1, H, W)
        return velocity_from_x(xt, x, t) if cfg.prediction == "x" else x

    def flops_per_image(self, height, width, text_len=0):
        """Forward FLOPs (2 per multiply-add) of the matmuls for one image of height x width inputs.

        Counts linear layers and attention products; norms, activations and embeddings are ignored
        (under 1% at these sizes). Training costs about 3x this (forward + backward).
        """
        cfg = self.cfg
        D, p, C = cfg.hidden, cfg.patch_size, cfg.in_channels
        N = (height // p) * (width // p)
        M = int(cfg.mlp_ratio * D)
        mlps = (cfg.moe_top_k + cfg.moe_shared_expert) if cfg.moe_experts else 1
        L = text_len + cfg.image_tokens if cfg.text_dim else 0
        per_block = (2 * N * D * 3 * D          # q, k, v
                     + 2 * 2 * N * N * D        # scores and weighted sum
                     + 2 * N * D * D            # output projection
                     + 2 * 2 * N * D * M * mlps  # MLP (the active experts of an MoE)
                     + 2 * N * D * cfg.moe_experts  # router
                     + 2 * D * 6 * D)           # adaLN modulation
        if L:
            per_block += 2 * N * D * D + 2 * L * D * 2 * D + 2 * 2 * N * L * D + 2 * N * D * D
        flops = cfg.depth * per_block
        flops += 2 * N * C * p * p * D + 2 * N * D * p * p * C + 2 * D * 2 * D   # patchify, output
        flops += 2 * 256 * D + 2 * D * D                                         # timestep MLP
        if L:
            flops += 2 * text_len * (cfg.text_dim * D + D * D)   # the caption's projection (not the image's tokens)
            T = text_len   # the caption refiner's blocks
            flops += cfg.text_layers * (2 * T * D * 4 * D + 2 * 2 * T * T * D + 2 * 2 * T * D * M)
        if cfg.image_dim:
            flops += 2 * (cfg.image_dim * D + D * D) + 2 * cfg.image_dim * cfg.image_tokens * D
        return flops


def training_memory(n_params, tokens, batch_size, hidden, heads, depth, grad_checkpoint, fused_attention,
                    world_size=1, ddp=False, fsdp=False, grad_accum_steps=1):
    """Bytes per rank of a training step, by term, for train.py's --dry_run (an estimate: MoE routing, text
    tokens, buffers and the allocator's slack are left out). tokens: per image; batch_size: per rank.

    states: fp32 weights, gradients, two Adam moments and the EMA, 20 bytes a parameter, sharded by FSDP.
    activations: 16-bit activations per block after Korthikanti et al. 2022 (arXiv:2205.05198), N b D (34 +
      5 heads N / D) bytes, or 2 N b D with recomputation (one block's full set then lives at a time). The second
      term is the attention scores (softmax input and output, N x N per head); fused SDPA kernels (flash,
      memory-efficient) recompute them in backward instead of storing them, so it is left out for those.
    ddp_buckets: DDP all-reduces from flat buckets that hold a second fp32 copy of every gradient (train.py does
      not use gradient_as_bucket_view).
    fsdp_unsharded_grads: with accumulation, FSDP2 skips the reduce-scatter until the last micro-step and keeps
      each gradient whole (fp32) until then."""
    N, b, D = tokens, batch_size, hidden
    per_block = N * b * D * (34 + (0 if fused_attention else 5 * heads * N / D))
    return {"states": n_params * 20 / (world_size if fsdp else 1),
            "activations": depth * 2 * N * b * D + per_block if grad_checkpoint else depth * per_block,
            "ddp_buckets": 4 * n_params if ddp and not fsdp else 0,
            "fsdp_unsharded_grads": 4 * n_params if fsdp and grad_accum_steps > 1 else 0}


def size_report(model, height, width, text_len, global_batch, memory=None):
    """train.py's sizes: parameters (those active per token with MoE), forward GFLOP per image and TFLOP per
    training step (forward + backward = 3 forwards) at height x width; with `memory` (training_memory's terms, in
    bytes) the memory per rank, in all and by term."""
    cfg, fwd = model.cfg, model.flops_per_image(height, width, text_len)
    moe = (f" ({model.num_params(active=True):,} active per token: {cfg.moe_top_k} of {cfg.moe_experts} experts"
           f"{' + shared' if cfg.moe_shared_expert else ''})" if cfg.moe_experts else "")
    report = (f"params {model.num_params():,}{moe} | forward {fwd / 1e9:.2f} GFLOP per image | "
              f"{3 * fwd * global_batch / 1e12:.3f} TFLOP per step at {height}x{width}")
    if memory:
        report += (f" | memory per GPU ~{sum(memory.values()) / 2**30:.2f} GiB ("
                   + ", ".join(f"{k.replace('_', ' ')} {v / 2**30:.2f}" for k, v in memory.items() if v) + ")")
    return report
