"""The Vision Transformer backbone shared by every method, with timm's parameter names.

Shape vocabulary, used in comments wherever a shape changes:
    B batch, C channels, N patches (grid h x w), K kept (visible) patches, M masked patches,
    D width, H heads, P = p * p * C values in one patch.
Parameter names are an interface (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.{i}.norm1|attn.qkv|attn.proj|ls1|norm2|mlp.fc1|mlp.fc2|ls2`, `norm`), so that timm and
official MAE weights load with `strict=True`; all key mapping lives in `mimkit.convert`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.config import ConfigError, check_positive, check_size, size_pair
from mimkit.masking import gather_tokens

LN_EPS = 1e-6  # MAE and timm use 1e-6 (transformers' ViTMAE defaults to 1e-12)

# Widths, depths and heads of the standard sizes (ViT paper; DeiT for tiny and small).
VIT_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


@dataclass
class EncoderConfig:
    """The encoder's architecture: the fields every method's model config starts with."""

    preset: str = ""
    """Named architecture (see the method's `PRESETS`); the fields given beside it override it."""
    img_size: int | tuple[int, int] = 224
    """Input resolution in pixels: one side (square) or [height, width]."""
    patch_size: int = 16
    """Patch side p in pixels."""
    in_chans: int = 3
    """Image channels."""
    embed_dim: int = 768
    """Encoder width D."""
    depth: int = 12
    """Encoder blocks."""
    num_heads: int = 12
    """Encoder attention heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width / block width."""

    def __post_init__(self) -> None:
        for name in ("patch_size", "in_chans", "depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: must be >= 1, got {getattr(self, name)!r}")
        if any(side % self.patch_size for side in check_size("model.img_size", self.img_size)):
            img = self.img_size if isinstance(self.img_size, int) else list(self.img_size)
            raise ConfigError(f"model.patch_size: {self.patch_size} does not divide model.img_size={img}")
        check_width("model.embed_dim", self.embed_dim, "model.num_heads", self.num_heads)
        check_positive("model.mlp_ratio", self.mlp_ratio)


def check_width(width_key: str, width: int, heads_key: str, heads: int) -> None:
    """A block width with fixed 2-D sin-cos positions (divisible by 4) split over `heads` heads."""
    if heads < 1:
        raise ConfigError(f"{heads_key}: must be >= 1, got {heads!r}")
    if width < 4 or width % 4:
        raise ConfigError(f"{width_key}: must be a positive multiple of 4 (2-D sin-cos positions), got {width!r}")
    if width % heads:
        raise ConfigError(f"{width_key}: {width} is not divisible by {heads_key}={heads}")


def sincos_pos_embed_2d(dim: int, grid: int | tuple[int, int], cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embedding of MAE (`get_2d_sincos_pos_embed`) on a grid of h x w patches
    (one int: square), row-major: (1 + N, D) or (N, D).

    Half the channels encode the row, half the column; the cls row is zeros. Computed in float64
    like the reference's NumPy code, then cast to float32.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    h, w = size_pair(grid)
    # The reference builds meshgrid(w, h) and encodes grid[0] (the column index) in the first half.
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def encode(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega  # (N, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (N, D/2)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)  # (N, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb])
    return emb.float()


# Up to this many keys, low-precision attention on the CPU is an explicit matmul + softmax: PyTorch's
# CPU SDPA kernel runs 3-7x slower in bf16 than that at 17-65 tokens (benchmarks/throughput.py).
CPU_LOWP_EXPLICIT_MAX_KEYS = 128


def attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, H, L, d) heads, by `scaled_dot_product_attention`, except
    for bf16 / fp16 on the CPU with short key sequences, where the explicit form (softmax in fp32)
    is faster. Both compute the same function."""
    if q.device.type != "cpu" or q.dtype == torch.float32 or k.shape[-2] > CPU_LOWP_EXPLICIT_MAX_KEYS:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, Lq, Lk)
    weights = F.dropout(scores.float().softmax(dim=-1), p=dropout_p).to(v.dtype)
    return weights @ v


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens by a strided convolution. `img_size` (H, W) and
    `grid_size` (h, w) are pairs; one int makes a square."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = size_pair(img_size), patch_size
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.img_size or x.shape[1] != self.proj.in_channels:
            raise ValueError(f"expected images of {self.proj.in_channels} x {self.img_size[0]} x {self.img_size[1]}, "
                             f"got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and `attention` (SDPA).

    `qv_bias=True` replaces the qkv bias by BEiT's separate `q_bias` and `v_bias` with no key bias
    (timm's Beit/EVA names; used by CAE): `qkv.weight` stays fused and has no bias of its own.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, qv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias and not qv_bias)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:  # the key bias is fixed at zero (BEiT): it would only add a constant per query
            qkv = F.linear(x, self.qkv.weight, torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias]))
        qkv = qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, D/H)
        x = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT); timm name `ls1.gamma` / `ls2.gamma`."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016), as used for fine-tuning and CAE."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, init_values: float | None = None, qv_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qv_bias=qv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return self.with_ffn(x)[0]

    def with_ffn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The block's output and its MLP branch before the residual (data2vec's FFN targets)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        ffn = self.ls2(self.mlp(self.norm2(x)))
        return x + self.drop_path2(ffn), ffn


def _normal_init(module: nn.Module, draw, layers: tuple[type, ...]) -> None:
    """`draw(weight, std=0.02)` for the weights of `layers`, zero biases; unit LayerNorms."""
    if isinstance(module, layers):
        draw(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def trunc_normal_init(module: nn.Module) -> None:
    """BEiT / SimMIM / I-JEPA initialisation: truncated N(0, 0.02) linear and convolution weights with
    zero bias, unit LayerNorms."""
    _normal_init(module, nn.init.trunc_normal_, (nn.Linear, nn.Conv2d))


def bert_init(module: nn.Module) -> None:
    """fairseq's `init_bert_params` for linear layers and LayerNorms (data2vec 2.0): N(0, 0.02) weights,
    zero biases, unit LayerNorms."""
    _normal_init(module, nn.init.normal_, (nn.Linear,))


def rescale_blocks(blocks: nn.ModuleList) -> None:
    """BEiT's `fix_init_weight` (SimMIM, I-JEPA): block i's output projections divided by sqrt(2 (i + 1))."""
    for i, blk in enumerate(blocks):
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            w.data.div_((2.0 * (i + 1)) ** 0.5)


def copy_to_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """Set a teacher encoder (a `VisionTransformer`) to the student's weights of the same names, and take
    its gradients away: how an EMA teacher starts (I-JEPA, data2vec 2.0)."""
    own = teacher.state_dict()
    teacher.load_state_dict({k: v for k, v in student.state_dict().items() if k in own})
    teacher.requires_grad_(False)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter (same names); parameters
    the student does not train (fixed sin-cos positions) are copied, as fairseq's EMAModule does."""
    source = dict(student.named_parameters())
    trained = [(t, source[name]) for name, t in teacher.named_parameters() if source[name].requires_grad]
    if trained:
        torch._foreach_mul_([t for t, _ in trained], decay)
        torch._foreach_add_([t for t, _ in trained], [s.detach() for _, s in trained], alpha=1 - decay)
    for name, t in teacher.named_parameters():
        if not source[name].requires_grad:
            t.copy_(source[name])


def init_weights(module: nn.Module) -> None:
    """MAE's `_init_weights`: xavier-uniform linear layers with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


POOLS = ("cls", "mean", "tokens")  # what `pooled_features` gives: evaluation and ONNX export use it


class VisionTransformer(nn.Module):
    """ViT encoder with a cls token and fixed 2-D sin-cos position embeddings (timm names).

    `forward_features` runs on all patches and never masks: it is what feature extraction and
    evaluation use. Methods subclass it and add their own masked forward.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, init_values: float | None = None, num_classes: int = 0,
                 global_pool: str = "token", qv_bias: bool = False):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        # The constructor arguments, so evaluation can build a classifier of the same encoder.
        self.arch = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         drop_path_rate=drop_path_rate, init_values=init_values, num_classes=num_classes,
                         global_pool=global_pool, qv_bias=qv_bias)
        self.embed_dim, self.num_heads, self.global_pool = embed_dim, num_heads, global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A parameter (as in MAE and timm) so fine-tuning can unfreeze it; fixed during pretraining.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim),
                                      requires_grad=False)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth decay rule
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=r, init_values=init_values, qv_bias=qv_bias)
            for r in rates
        )
        # timm / MAE fine-tuning: average pooling normalises after pooling (`fc_norm`) instead of
        # before it (`norm`), so the two layouts have different keys.
        self.norm = nn.Identity() if global_pool == "avg" else nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=LN_EPS) if global_pool == "avg" else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    @property
    def img_size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return self.patch_embed.img_size

    @property
    def in_chans(self) -> int:
        return self.patch_embed.proj.in_channels

    def init_encoder(self) -> None:
        """MAE initialisation of the encoder: sin-cos positions, patch conv as a linear layer, tokens N(0, .02)."""
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, self.patch_embed.grid_size).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, imgs: Tensor) -> Tensor:
        """Patch tokens plus their position embeddings: (B, C, H, W) -> (B, N, D)."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def with_cls(self, x: Tensor) -> Tensor:
        """Prepend the cls token (plus its zero position row): (B, K, D) -> (B, 1 + K, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def run_blocks(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_encoder(self, imgs: Tensor, ids: Tensor) -> Tensor:
        """The encoder on the patches `ids` only (MAE: the visible ones; CAE also the masked ones, for its
        alignment target): (B, C, H, W), (B, K) -> (B, 1 + K, D), after the final norm."""
        x = gather_tokens(self.embed(imgs), ids)  # (B, N, D) -> (B, K, D)
        return self.run_blocks(self.with_cls(x))

    def forward_features(self, imgs: Tensor) -> Tensor:
        """All tokens, no masking: (B, C, H, W) -> (B, 1 + N, D), after the final norm."""
        return self.run_blocks(self.with_cls(self.embed(imgs)))

    def pooled_features(self, imgs: Tensor, pool: str = "cls") -> Tensor:
        """All tokens after the final norm, pooled (no masking): "cls" the cls token (B, D); "mean" the
        mean of the patch tokens (B, D), through `fc_norm` when the model pools by averaging (then it is
        exactly what its head sees); "tokens" the patch tokens (B, N, D)."""
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        x = self.forward_features(imgs)  # (B, 1 + N, D)
        if pool == "cls":
            return x[:, 0]
        if pool == "tokens":
            return x[:, 1:]
        mean = x[:, 1:].mean(dim=1)
        return self.fc_norm(mean) if self.global_pool == "avg" else mean

    def pool(self, x: Tensor) -> Tensor:
        """(B, 1 + N, D) -> (B, D): the cls token, or the mean of the patch tokens, then `fc_norm`."""
        return self.fc_norm(x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0])

    def forward(self, imgs: Tensor) -> Tensor:
        """Class logits (B, num_classes), or pooled features (B, D) without a head."""
        return self.head(self.pool(self.forward_features(imgs)))

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides norms and biases (timm's contract)."""
        return {"pos_embed", "cls_token"}

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay (MAE `param_groups_lrd`): 0 embeddings,
        i + 1 for block i, depth + 1 for everything after the blocks."""
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())



def resample_pos_embed(pos_embed: Tensor, grid: int | tuple[int, int], num_prefix: int = 1,
                       source: int | tuple[int, int] | None = None) -> Tensor:
    """Resize a (1, prefix + h*w, D) position embedding of a `source` grid (default: square) to a grid of
    h' x w' patches, bicubic, as timm and MAE's `interpolate_pos_embed` do; the prefix (cls) rows are
    kept. Same size: returned as is."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    if source is None:
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            raise ValueError(f"position embedding of {patches.shape[1]} patches is not a square grid; give its grid")
        source = side
    (h0, w0), (h, w) = size_pair(source), size_pair(grid)
    if h0 * w0 != patches.shape[1]:
        raise ValueError(f"position embedding of {patches.shape[1]} patches is not a {h0} x {w0} grid")
    if (h0, w0) == (h, w):
        return pos_embed
    D = patches.shape[-1]
    x = patches.reshape(1, h0, w0, D).permute(0, 3, 1, 2).float()  # (1, D, h0, w0)
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(1, h * w, D).to(pos_embed.dtype)
    return torch.cat([prefix, x], dim=1)
