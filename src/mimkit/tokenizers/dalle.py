"""The encoder of OpenAI's DALL-E discrete VAE (Ramesh et al. 2021), the tokenizer of BEiT and CAE.

Architecture and parameter names follow `dall_e/encoder.py` of openai/DALL-E, so its released
weights (`encoder.pkl`) load with `strict=True`: a 7x7 input convolution, four groups of two
bottleneck residual blocks (widths 256, 512, 1024, 2048; 2x2 max-pooling after the first three, so
8x downsampling), ReLU and a 1x1 convolution to 8192 logits per position. Inputs are pixels in
[0, 1] squeezed by `map_pixels` (logit-Laplace eps 0.1); the code of a position is its argmax, as in
BEiT's `get_codebook_indices`. Convolutions run in float32 (DALL-E runs all but the last in fp16 on GPU).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGIT_LAPLACE_EPS = 0.1  # dall_e/utils.py


def map_pixels(x: Tensor) -> Tensor:
    """[0, 1] -> [eps, 1 - eps], the input range the d-VAE was trained on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class Conv2d(nn.Module):
    """DALL-E's convolution: parameters `w` (out, in, k, k) and `b`, 'same' padding, N(0, 1 / fan_in) init."""

    def __init__(self, n_in: int, n_out: int, kw: int, generator: torch.Generator | None = None):
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.zeros(n_out))
        if not self.w.is_meta:
            self.w.data.normal_(std=(n_in * kw**2) ** -0.5, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    """Identity (or 1x1 projection) plus a 4-convolution bottleneck scaled by 1 / n_layers**2."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, generator: torch.Generator | None = None):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1, generator) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, n_hid, 3, generator)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv2d(n_hid, n_hid, 3, generator)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv2d(n_hid, n_hid, 3, generator)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv2d(n_hid, n_out, 1, generator)),
        ]))

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleTokenizer(nn.Module):
    """DALL-E d-VAE encoder as a tokenizer: (B, 3, 8h, 8w) pixels in [0, 1] -> (B, h * w) codes in [0, 8192).

    A new instance is randomly initialised from a private generator (seed 0), so building one never
    moves the global random state; real use loads the released weights with `load_weights`.
    """

    downsample = 8  # input pixels per code along a side
    vocab_size = 8192

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, group_count: int = 4):
        super().__init__()
        self.vocab_size = vocab_size
        g = torch.Generator().manual_seed(0)
        n_layers = group_count * n_blk_per_group
        widths = [n_hid * 2**i for i in range(group_count)]  # 256, 512, 1024, 2048

        def group(i: int) -> nn.Sequential:
            n_in = widths[max(i - 1, 0)]
            layers = [(f"block_{j + 1}", EncoderBlock(n_in if j == 0 else widths[i], widths[i], n_layers, g))
                      for j in range(n_blk_per_group)]
            if i < group_count - 1:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            return nn.Sequential(OrderedDict(layers))

        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(3, n_hid, 7, g)),
            *[(f"group_{i + 1}", group(i)) for i in range(group_count)],
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                  ("conv", Conv2d(widths[-1], vocab_size, 1, g))]))),
        ]))

    def logits(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, vocab, H / 8, W / 8)."""
        return self.blocks(map_pixels(pixels.float()))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.logits(pixels).argmax(dim=1).flatten(1)  # (B, h * w), row-major

    def load_weights(self, state: Mapping[str, Tensor]) -> None:
        self.load_state_dict(state, strict=True)
