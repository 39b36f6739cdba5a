"""The binary tokenizer: a conv autoencoder whose latent is signs (+1/-1).

State-dict compatible with the official `qae.VQModel` (keys `encoder.*`, `decoder.*`; the
quantiser has no weights). The decoder's adaptive group norm is conditioned on per-channel
statistics of the +/-1 latent it decodes; upsampling is conv-to-4C followed by depth-to-space.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VAEConfig


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.norm1 = nn.GroupNorm(32, cin, eps=1e-6)
        self.norm2 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.cin != self.cout:
            x = self.nin_shortcut(x)
        return h + x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        cin = ch
        for level, m in enumerate(mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResBlock(cin, ch * m))
                cin = ch * m
            if level < len(mult) - 1:
                stage.downsample = nn.Conv2d(cin, cin, 3, stride=2, padding=1)
            self.down.append(stage)
        self.mid_block = nn.ModuleList(ResBlock(cin, cin) for _ in range(cfg.num_res_blocks))
        self.norm_out = nn.GroupNorm(32, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                x = block(x)
            if hasattr(stage, "downsample"):
                x = stage.downsample(x)
        for block in self.mid_block:
            x = block(x)
        return self.conv_out(swish(self.norm_out(x)))


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm(32, no affine) whose scale/shift are Linear maps of the latent's channel std/mean."""

    def __init__(self, z_channels: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        flat = style.flatten(2)
        # Unbiased variance (N-1), as torch.var's default in the official code.
        scale = self.gamma((flat.var(dim=-1) + self.eps).sqrt()).view(b, c, 1, 1)
        bias = self.beta(flat.mean(dim=-1)).view(b, c, 1, 1)
        return scale * F.group_norm(x, 32, eps=self.eps) + bias


def depth_to_space(x: torch.Tensor, block: int) -> torch.Tensor:
    """DCR depth-to-space: out[c, by+i, bx+j] = in[(i*block + j)*C + c, y, x]."""
    b, c, h, w = x.shape
    s = block * block
    x = x.view(b, block, block, c // s, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c // s, h * block, w * block)


class Upsampler(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim * 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv1(x), 2)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1, bias=True)
        self.mid_block = nn.ModuleList(ResBlock(cin, cin) for _ in range(cfg.num_res_blocks))
        ups: list[nn.Module] = []
        adaptive: list[nn.Module] = []
        for level in reversed(range(len(mult))):
            adaptive.insert(0, AdaptiveGroupNorm(cfg.z_channels, cin))
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResBlock(cin, ch * mult[level]))
                cin = ch * mult[level]
            if level > 0:
                stage.upsample = Upsampler(cin)
            ups.insert(0, stage)
        self.up = nn.ModuleList(ups)
        self.adaptive = nn.ModuleList(adaptive)
        self.norm_out = nn.GroupNorm(32, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        style = z
        x = self.conv_in(z)
        for block in self.mid_block:
            x = block(x)
        for level in reversed(range(len(self.up))):
            x = self.adaptive[level](x, style)
            for block in self.up[level].block:
                x = block(x)
            if level > 0:
                x = self.up[level].upsample(x)
        return self.conv_out(swish(self.norm_out(x)))


class BinaryAutoencoder(nn.Module):
    """Encoder -> sign -> decoder. Keys match the official VQModel (`encoder.*`, `decoder.*`)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode_continuous(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> latent of +/-1 (+1 where the encoder output is > 0)."""
        pre = self.encoder(image)
        return torch.where(pre > 0, torch.ones_like(pre), -torch.ones_like(pre))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)
