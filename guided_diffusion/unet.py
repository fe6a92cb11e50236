"""
The U-Net of guided-diffusion (Dhariwal & Nichol 2021), which the paper uses as is.

Module and parameter names follow guided-diffusion's exactly (``input_blocks.N.M``,
``in_layers.0/2``, ``emb_layers.1``, ``out_layers.0/3``, ``qkv``, ``proj_out``, ``op``,
``conv`` ...), so checkpoints of the original code load with strict=True.
For SAR-to-optical translation the input has 3 + C_sar channels: the noisy optical
image and the clean SAR image, concatenated by the diffusion process.
"""

import math
from abc import abstractmethod

import torch as th
import torch.nn.functional as F
from torch import nn

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to ``x`` given the timestep embeddings ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential module that passes the timestep embedding to the children that take it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """
    Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.

    :param dims: 1, 2 or 3; with 3 only the inner two dimensions are upsampled.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(
                x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest"
            )
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """
    2x downsampling by a strided 3x3 convolution, or by average pooling.

    :param dims: 1, 2 or 3; with 3 only the inner two dimensions are downsampled.
    """

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(
                dims, self.channels, self.out_channels, 3, stride=stride, padding=1
            )
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


def _add_into(fresh, other):
    """
    ``other + fresh``, written into ``fresh``: a block's own new output that nothing
    else reads (addition is commutative, so the numbers are the same). Where the sum
    needs a wider dtype than ``fresh`` (a float32 input under autocast, say) it is
    made out of place, as the plain sum would be.
    """
    if th.result_type(fresh, other) != fresh.dtype:
        return other + fresh
    return fresh.add_(other)


class ResBlock(TimestepBlock):
    """
    A residual block conditioned on the timestep embedding.

    :param channels: the number of input channels.
    :param emb_channels: the number of timestep embedding channels.
    :param dropout: the dropout rate.
    :param out_channels: the number of output channels (default: channels).
    :param use_conv: a 3x3 instead of a 1x1 convolution on the skip path when the
        channel count changes.
    :param use_scale_shift_norm: the embedding scales and shifts the normalised
        activations (FiLM) instead of being added to them.
    :param use_checkpoint: recompute activations in the backward pass to save memory.
    :param up: upsample inside the block. :param down: downsample inside the block.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        # The SiLUs after a normalisation work in place: the norm's output is a fresh
        # tensor that nothing else reads, and the norm's backward needs only its
        # input (see _forward for why fewer fresh tensors matter).
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(inplace=True),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(
                emb_channels,
                2 * self.out_channels if use_scale_shift_norm else self.out_channels,
            ),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(inplace=True),
            nn.Dropout(p=dropout),
            zero_module(
                conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)
            ),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(
                dims, channels, self.out_channels, 3, padding=1
            )
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        """
        :param x: (N, C, ...) features. :param emb: (N, emb_channels) embeddings.
        :return: (N, out_channels, ...) features.
        """
        return checkpoint(
            self._forward, (x, emb), self.parameters(), self.use_checkpoint
        )

    def _forward(self, x, emb):
        # The element-wise steps below write into tensors made just before them
        # (norm and convolution outputs) instead of allocating new ones: the same
        # operations in the same order, so the same numbers. At 256 px a new
        # activation is 32-64 MiB, which the allocator often has to map fresh from
        # the kernel: a page fault and a zeroed page per 4 KiB on first touch.
        if self.updown:
            # Resample between the normalisation and the convolution.
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = th.chunk(emb_out, 2, dim=1)
            h = out_norm(h).mul_(1 + scale).add_(shift)
            h = out_rest(h)
        else:
            h = self.out_layers(h.add_(emb_out))
        return _add_into(h, self.skip_connection(x))


class AttentionBlock(nn.Module):
    """
    Self-attention over all spatial positions.

    :param num_heads: the number of heads (used when num_head_channels is -1).
    :param num_head_channels: a fixed width per head; overrides num_heads.
    :param use_new_attention_order: split q, k, v before the heads (QKVAttention);
        the default reproduces the original ordering (QKVAttentionLegacy).
    :param use_sdpa: compute the same attention with the fused
        ``scaled_dot_product_attention`` kernel instead of explicit einsums.
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
        use_sdpa=False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels != 0:
                raise ValueError(
                    f"--num_head_channels {num_head_channels} does not divide the {channels} "
                    "channels of an attention block"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        if use_new_attention_order:
            self.attention = QKVAttention(self.num_heads, use_sdpa=use_sdpa)
        else:
            self.attention = QKVAttentionLegacy(self.num_heads, use_sdpa=use_sdpa)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # (B, C, T) with T = H * W
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        h = self.attention(qkv)  # (B, C, T)
        h = self.proj_out(h)
        return _add_into(h, x).reshape(b, c, *spatial)


# On a CPU, sequences at least this long take the fused attention kernel's layout;
# for shorter ones the unfused kernel is faster (benchmarks/README.md, "Figures
# behind design choices").
FUSED_ATTENTION_MIN_LENGTH = 256


def fused_attention_min_length(device):
    """
    The shortest sequence that takes the fused kernel's layout on ``device``: on a
    CPU :data:`FUSED_ATTENTION_MIN_LENGTH`; elsewhere every length, since CUDA's
    flash and memory-efficient kernels run only on that layout and beat the
    unfused one at every length.
    """
    return FUSED_ATTENTION_MIN_LENGTH if device.type == "cpu" else 0


def _attend(q, k, v, use_sdpa, heads=1):
    """
    softmax(q^T k / sqrt(ch)) applied to v, independently for every (batch, head).

    :param q, k, v: (B * heads, ch, T) queries, keys and values.
    :param use_sdpa: use the fused kernel; otherwise the original einsums.
    :param heads: the heads in the first dimension (the fused layout separates them).
    :return: (B * heads, ch, T) attended values.
    """
    if use_sdpa:
        # The kernel wants (..., T, ch); its default scale 1 / sqrt(ch) equals the
        # original's ch^-1/4 on q and on k. The fused kernels (flash, memory-efficient)
        # take only contiguous 4-D inputs (B, heads, T, ch), so q, k and v are copied
        # into that layout (T x ch values each, against T x T x ch operations); for
        # short sequences on a CPU the unfused kernel on the transposed views is faster.
        length = q.shape[-1]
        if length >= fused_attention_min_length(q.device):
            ch = q.shape[1]
            q, k, v = (
                z.reshape(-1, heads, ch, length).transpose(2, 3).contiguous()
                for z in (q, k, v)
            )  # (B, heads, T, ch)
            a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, ch)
            return a.transpose(2, 3).reshape(-1, ch, length)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )  # (B*H, T, C)
        return a.transpose(1, 2)
    ch = q.shape[1]
    # Scaling q and k each by ch^-1/4 is more stable in fp16 than scaling q k^T.
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = th.einsum("bct,bcs->bts", q * scale, k * scale)  # (B*H, T, T)
    weight = th.softmax(weight.float(), dim=-1).type(weight.dtype)
    return th.einsum("bts,bcs->bct", weight, v)  # (B*H, C, T)


class QKVAttentionLegacy(nn.Module):
    """
    Attention with guided-diffusion's original layout: qkv is reshaped to
    (B * heads, 3 * ch, T) first, then split into q, k and v.

    :param use_sdpa: compute it with ``scaled_dot_product_attention``.
    """

    def __init__(self, n_heads, use_sdpa=False):
        super().__init__()
        self.n_heads = n_heads
        self.use_sdpa = use_sdpa

    def forward(self, qkv):
        """
        :param qkv: (B, H * 3 * C, T) queries, keys and values.
        :return: (B, H * C, T) attended values.
        """
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        a = _attend(q, k, v, self.use_sdpa, self.n_heads)  # (B*H, C, T)
        return a.reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """
    Attention that splits q, k and v first, then the heads.

    :param use_sdpa: compute it with ``scaled_dot_product_attention``.
    """

    def __init__(self, n_heads, use_sdpa=False):
        super().__init__()
        self.n_heads = n_heads
        self.use_sdpa = use_sdpa

    def forward(self, qkv):
        """
        :param qkv: (B, 3 * H * C, T) queries, keys and values.
        :return: (B, H * C, T) attended values.
        """
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = (
            part.reshape(bs * self.n_heads, ch, length) for part in qkv.chunk(3, dim=1)
        )
        a = _attend(q, k, v, self.use_sdpa, self.n_heads)  # (B*H, C, T)
        return a.reshape(bs, -1, length)


class UNetModel(nn.Module):
    """
    The full U-Net with attention and timestep embedding.

    :param image_size: the input resolution (kept for reference).
    :param in_channels: input channels: 3 noisy optical + the SAR channels.
    :param model_channels: base channel count.
    :param out_channels: 3, or 6 when the variance is learned.
    :param num_res_blocks: residual blocks per resolution.
    :param attention_resolutions: downsampling rates (1, 2, 4, ...) at which to attend;
        with 4, attention is used at 4x downsampling.
    :param dropout: the dropout probability.
    :param channel_mult: channel multiplier per resolution level.
    :param conv_resample: learned convolutions for up- and downsampling.
    :param dims: 1-D, 2-D or 3-D signals.
    :param use_checkpoint: gradient checkpointing to save memory.
    :param use_fp16: run the body in float16 (convert_to_fp16 is called by the trainer).
    :param num_heads: attention heads per attention layer.
    :param num_head_channels: a fixed width per head; overrides num_heads.
    :param num_heads_upsample: heads in the upsampling path (-1: num_heads; deprecated).
    :param use_scale_shift_norm: FiLM-like conditioning on the timestep.
    :param resblock_updown: residual blocks for up- and downsampling.
    :param use_new_attention_order: QKVAttention instead of the legacy order.
    :param use_sdpa: attention through the fused ``scaled_dot_product_attention``
        kernel (the same function and parameters); off keeps the original einsums.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        use_sdpa=False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.dtype = th.float16 if use_fp16 else th.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

        def res_block(ch_in, ch_out, **kwargs):
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kwargs,
            )

        def attention(ch, heads):
            return AttentionBlock(
                ch,
                use_checkpoint=use_checkpoint,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order,
                use_sdpa=use_sdpa,
            )

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
        )
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                out_ch = ch
                self.input_blocks.append(
                    TimestepEmbedSequential(
                        res_block(ch, out_ch, down=True)
                        if resblock_updown
                        else Downsample(
                            ch, conv_resample, dims=dims, out_channels=out_ch
                        )
                    )
                )
                ch = out_ch
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch)
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res_block(ch + ich, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    out_ch = ch
                    layers.append(
                        res_block(ch, out_ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(inplace=True),  # on the norm's fresh output, as in ResBlock
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def convert_to_fp16(self):
        """Convert the body of the model (not the embeddings or the output) to float16."""
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)
        self.output_blocks.apply(convert_module_to_f16)
        self.dtype = th.float16

    def convert_to_fp32(self):
        """Convert the body of the model back to float32."""
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        self.output_blocks.apply(convert_module_to_f32)
        self.dtype = th.float32

    def forward(self, x, timesteps):
        """
        :param x: (N, in_channels, H, W): noisy optical and SAR channels.
        :param timesteps: (N,) timesteps (indices, or floats when rescaled).
        :return: (N, out_channels, H, W).
        """
        hs = []
        emb = self.time_embed(
            timestep_embedding(timesteps, self.model_channels)
        )  # (N, 4C)
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = th.cat([h, hs.pop()], dim=1)
            h = module(h, emb)
        h = h.type(x.dtype)
        return self.out(h)
