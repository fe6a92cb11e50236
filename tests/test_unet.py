"""Tests of guided_diffusion.unet and guided_diffusion.nn."""

import ast
import copy
import math

import pytest
import torch as th
import torch.nn.functional as F
from conftest import FIXTURES_DIR, randomize_, tiny_model_and_diffusion

from guided_diffusion import nn as gnn
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.unet import (
    AttentionBlock,
    Downsample,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    Upsample,
)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _inputs(n=2, size=32, seed=0):
    gen = th.Generator().manual_seed(seed)
    x = th.randn(n, 6, size, size, generator=gen)
    t = th.randint(0, 50, (n,), generator=gen)
    return x, t


# ---------------------------------------------------------------- state-dict fixtures


def _read_fixture(name):
    path = FIXTURES_DIR / name
    entries = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split(" ", 1)
            entries.append((key, tuple(ast.literal_eval(shape))))
    return entries


@pytest.mark.parametrize(
    "fixture,flags",
    [
        (
            "unet_keys_paper.txt",
            dict(image_size=256, num_channels=128, num_res_blocks=3, learn_sigma=False),
        ),
        (
            "unet_keys_small.txt",
            dict(
                image_size=64,
                num_channels=64,
                num_res_blocks=2,
                attention_resolutions="16,8",
                learn_sigma=False,
            ),
        ),
    ],
)
def test_state_dict_matches_the_original_implementation(fixture, flags):
    expected = _read_fixture(fixture)
    model, _ = create_model_and_diffusion(**flags)
    actual = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    assert not missing and not unexpected, (
        f"missing from the model: {missing[:10]} ({len(missing)} in all); "
        f"not in {fixture}: {unexpected[:10]} ({len(unexpected)} in all)"
    )
    assert len(actual) == len(expected)


@pytest.mark.parametrize(
    "fixture,flags",
    [
        (
            "unet_keys_paper.txt",
            dict(image_size=256, num_channels=128, num_res_blocks=3),
        ),
        ("unet_keys_small.txt", dict(image_size=64, num_channels=64, num_res_blocks=2)),
    ],
)
def test_state_dict_with_use_sdpa_matches_the_original_implementation(fixture, flags):
    # The fused attention kernel is a different computation, not different weights.
    expected = _read_fixture(fixture)
    # Shapes are all this test needs: the meta device skips allocating the weights.
    with th.device("meta"):
        model, _ = create_model_and_diffusion(**flags, learn_sigma=False, use_sdpa=True)
    actual = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    assert sorted(actual) == sorted(expected)


# ---------------------------------------------------------------- the whole model


def test_fresh_model_outputs_zero_of_the_right_shape():
    x, t = _inputs()
    model, _ = tiny_model_and_diffusion()
    out = model(x, t)
    assert out.shape == (2, 3, 32, 32)
    assert th.all(out == 0), "the output convolution must start at zero"
    model, _ = tiny_model_and_diffusion(learn_sigma=True)
    assert model(x, t).shape == (2, 6, 32, 32)


def test_output_depends_on_every_input_and_not_on_batch_mates():
    model, _ = tiny_model_and_diffusion()
    randomize_(model, seed=0)
    x, t = _inputs()
    with th.no_grad():
        out = model(x, t)
        alone = model(x[:1], t[:1])
        other_t = model(x, t + 7)
        other_sar = model(th.cat([x[:, :3], x[:, 3:] + 1], dim=1), t)
    assert out.abs().max() > 0
    th.testing.assert_close(out[:1], alone, rtol=1e-4, atol=1e-6)
    assert _rel_err(other_t, out) > 1e-3
    assert _rel_err(other_sar, out) > 1e-3


def test_gradient_checkpointing_computes_the_same_gradients():
    plain, _ = tiny_model_and_diffusion()
    checkpointed, _ = tiny_model_and_diffusion(use_checkpoint=True)
    randomize_(plain, seed=3)
    checkpointed.load_state_dict(plain.state_dict())
    x, t = _inputs()
    outputs = []
    for model in (plain, checkpointed):
        out = model(x, t)
        out.square().mean().backward()
        outputs.append(out.detach())
    th.testing.assert_close(outputs[1], outputs[0])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        th.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_fp16_body_matches_fp32():
    reference, _ = tiny_model_and_diffusion()
    half, _ = tiny_model_and_diffusion(use_fp16=True)
    randomize_(reference, seed=4)
    half.load_state_dict(reference.state_dict())
    half.convert_to_fp16()
    dtypes = {name: p.dtype for name, p in half.named_parameters()}
    assert dtypes["input_blocks.0.0.weight"] == th.float16
    assert dtypes["middle_block.1.qkv.weight"] == th.float16
    # The timestep embedding and the output layer stay in float32.
    assert dtypes["time_embed.0.weight"] == th.float32
    assert dtypes["out.2.weight"] == th.float32
    x, t = _inputs()
    with th.no_grad():
        expected = reference(x, t)
        out = half(x, t)
    assert out.dtype == th.float32
    assert _rel_err(out, expected) < 1e-2

    half.convert_to_fp32()
    assert all(p.dtype == th.float32 for p in half.parameters())
    for (name, a), b in zip(reference.named_parameters(), half.parameters()):
        rounded = a.half().float() if dtypes[name] == th.float16 else a
        th.testing.assert_close(b, rounded, rtol=0, atol=0, msg=name)


def _legacy_qkv_rows(channels, heads):
    """
    Row order that turns a qkv projection for QKVAttention (q, k, v, then heads)
    into one for the legacy layout (heads, then q, k, v): legacy row
    h * 3ch + j * ch + c reads new row j * heads * ch + h * ch + c.
    """
    ch = channels // heads
    return th.arange(3 * channels).reshape(3, heads, ch).transpose(0, 1).reshape(-1)


def test_new_attention_order_is_the_legacy_order_with_permuted_qkv_rows():
    """
    Both orders compute multi-head attention; they differ only in which rows of
    the qkv projection feed which head's q, k and v. So a randomised model with
    use_new_attention_order equals a legacy model whose qkv rows are permuted,
    and does not equal one with the same, unpermuted rows.
    """
    new, _ = tiny_model_and_diffusion(use_new_attention_order=True)
    randomize_(new, seed=5, std=0.2)
    legacy, _ = tiny_model_and_diffusion()
    state = new.state_dict()
    permuted = dict(state)
    blocks = [(n, m) for n, m in new.named_modules() if isinstance(m, AttentionBlock)]
    assert len(blocks) == 4  # at 16x16: one down, one in the middle, two up
    for name, block in blocks:
        assert block.num_heads > 1, "with one head both orders agree trivially"
        rows = _legacy_qkv_rows(block.channels, block.num_heads)
        for suffix in ("weight", "bias"):
            key = f"{name}.qkv.{suffix}"
            permuted[key] = state[key][rows]
    # Fully convolutional: 16x16 inputs reach every block at a quarter of the cost.
    x, t = _inputs(size=16)
    with th.no_grad():
        out = new(x, t)
        legacy.load_state_dict(permuted)
        th.testing.assert_close(legacy(x, t), out, rtol=1e-4, atol=1e-5)
        legacy.load_state_dict(state)
        assert _rel_err(legacy(x, t), out) > 1e-2


def test_resblock_updown_model_resamples_inside_its_residual_blocks():
    """
    With resblock_updown, the model's one downsampling and one upsampling step are
    residual blocks, and inside the randomised model each computes the
    hand-written ResBlock of guided-diffusion (resampling between the first
    normalisation and the first convolution, on both the branch and the skip).
    """
    model, _ = tiny_model_and_diffusion(resblock_updown=True)
    randomize_(model, seed=5, std=0.2)
    assert not any(
        isinstance(layer, (Downsample, Upsample))
        for blocks in (model.input_blocks, model.output_blocks)
        for sequence in blocks
        for layer in sequence
    ), "resampling must happen in residual blocks"
    calls = []
    for module in model.modules():
        if isinstance(module, ResBlock) and module.updown:
            module.register_forward_hook(
                lambda m, args, out: calls.append((m, *args, out))
            )
    # Fully convolutional: 16x16 inputs reach every block at a quarter of the cost.
    x, t = _inputs(size=16)
    with th.no_grad():
        model(x, t)
    assert [(h.shape[-1], out.shape[-1]) for _, h, _, out in calls] == [
        (16, 8),
        (8, 16),
    ]
    for block, h, emb, out in calls:
        skip, branch = _resblock_reference(block, h, emb)
        _assert_branch_close(out, skip, branch)


# ---------------------------------------------------------------- attention


def _split_heads_then_qkv(qkv, heads):
    """Reference for the legacy order: (B, heads*3*ch, T) -> heads first, then q, k, v."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    grouped = qkv.reshape(b * heads, 3 * ch, length)
    return grouped[:, :ch], grouped[:, ch : 2 * ch], grouped[:, 2 * ch :], ch


def _split_qkv_then_heads(qkv, heads):
    """Reference for the new order: q, k, v first, then heads."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = (qkv[:, i * heads * ch : (i + 1) * heads * ch] for i in range(3))
    return (
        q.reshape(b * heads, ch, length),
        k.reshape(b * heads, ch, length),
        v.reshape(b * heads, ch, length),
        ch,
    )


def _attend(q, k, v, ch, batch):
    """softmax(q^T k / sqrt(ch)) applied to v, per (batch * head); (B, heads*ch, T)."""
    weight = th.softmax(q.transpose(1, 2) @ k / math.sqrt(ch), dim=-1)  # (BH, T, S)
    out = v @ weight.transpose(1, 2)  # (BH, ch, T)
    return out.reshape(batch, -1, q.shape[-1])


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_qkv_attention_matches_hand_computation(heads):
    gen = th.Generator().manual_seed(heads)
    qkv = th.randn(3, heads * 3 * 8, 10, generator=gen, dtype=th.float64)
    legacy_ref = _attend(*_split_heads_then_qkv(qkv, heads), batch=3)
    new_ref = _attend(*_split_qkv_then_heads(qkv, heads), batch=3)
    legacy = QKVAttentionLegacy(heads)(qkv.float()).double()
    new = QKVAttention(heads)(qkv.float()).double()
    th.testing.assert_close(legacy, legacy_ref, rtol=1e-4, atol=1e-5)
    th.testing.assert_close(new, new_ref, rtol=1e-4, atol=1e-5)
    if heads == 1:
        th.testing.assert_close(legacy, new, rtol=1e-5, atol=1e-6)
    else:
        assert _rel_err(legacy, new) > 0.1, "the head orders must differ for heads > 1"


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_uses_the_requested_head_order(new_order):
    block = AttentionBlock(64, num_heads=4, use_new_attention_order=new_order)
    randomize_(block, seed=6)
    x = th.randn(2, 64, 4, 4, generator=th.Generator().manual_seed(0))
    with th.no_grad():
        out = block(x)
        flat = x.reshape(2, 64, 16)
        qkv = block.qkv(block.norm(flat))
        split = _split_qkv_then_heads if new_order else _split_heads_then_qkv
        h = _attend(*split(qkv, 4), batch=2)
        expected = (flat + block.proj_out(h)).reshape(x.shape)
    th.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_num_head_channels_sets_the_head_count():
    gen = th.Generator().manual_seed(1)
    block = AttentionBlock(64, num_heads=1, num_head_channels=16)
    randomize_(block, seed=7)
    x = th.randn(1, 64, 3, 3, generator=gen)
    with th.no_grad():
        flat = x.reshape(1, 64, 9)
        qkv = block.qkv(block.norm(flat))
        expected = flat + block.proj_out(
            _attend(*_split_heads_then_qkv(qkv, 4), batch=1)
        )
        th.testing.assert_close(
            block(x), expected.reshape(x.shape), rtol=1e-4, atol=1e-5
        )


# ---------------------------------------------------------------- blocks


def test_fresh_resblock_is_its_skip_connection():
    x = th.randn(2, 64, 8, 8)
    emb = th.randn(2, 128)
    same = ResBlock(64, 128, dropout=0.0)
    th.testing.assert_close(same(x, emb), x, rtol=0, atol=0)
    wider = ResBlock(64, 128, dropout=0.0, out_channels=96)
    th.testing.assert_close(wider(x, emb), wider.skip_connection(x))
    assert wider.skip_connection.weight.shape == (96, 64, 1, 1)
    wider_conv = ResBlock(64, 128, dropout=0.0, out_channels=96, use_conv=True)
    assert wider_conv.skip_connection.weight.shape == (96, 64, 3, 3)


def _group_norm(x, weight, bias, groups=32, eps=1e-5):
    """GroupNorm written out: normalise each group of channels, then scale and shift."""
    g = x.reshape(x.shape[0], groups, -1)
    mean = g.mean(dim=-1, keepdim=True)
    var = g.var(dim=-1, unbiased=False, keepdim=True)
    g = (g - mean) / th.sqrt(var + eps)
    return g.reshape(x.shape) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def _silu(x):
    return x * th.sigmoid(x)


def _resblock_reference(block, x, emb):
    """
    guided-diffusion's ResBlock (Dhariwal & Nichol 2021) written out in float64
    from the block's parameters:

        h = SiLU(GN(x)); resample h and x; h = conv(h)
        e = Linear(SiLU(emb))
        h = GN(h) * (1 + scale) + shift, (scale, shift) = e    (scale-shift norm)
          | GN(h + e)                                          (otherwise)
        out = skip(x) + conv(SiLU(h))

    :return: (skip(x), residual branch), each (N, out_channels, H', W').
    """
    p = {k: v.detach().double() for k, v in block.state_dict().items()}
    x, emb = x.double(), emb.double()
    h = _silu(_group_norm(x, p["in_layers.0.weight"], p["in_layers.0.bias"]))
    if isinstance(block.x_upd, Upsample):
        h, x = (
            z.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) for z in (h, x)
        )
    elif isinstance(block.x_upd, Downsample):
        n, c, height, width = x.shape
        h, x = (
            z.reshape(n, c, height // 2, 2, width // 2, 2).mean(dim=(3, 5))
            for z in (h, x)
        )
    h = F.conv2d(h, p["in_layers.2.weight"], p["in_layers.2.bias"], padding=1)
    e = F.linear(_silu(emb), p["emb_layers.1.weight"], p["emb_layers.1.bias"])
    e = e[:, :, None, None]
    norm = p["out_layers.0.weight"], p["out_layers.0.bias"]
    if block.use_scale_shift_norm:
        scale, shift = e.chunk(2, dim=1)
        h = _group_norm(h, *norm) * (1 + scale) + shift
    else:
        h = _group_norm(h + e, *norm)
    branch = F.conv2d(
        _silu(h), p["out_layers.3.weight"], p["out_layers.3.bias"], padding=1
    )
    if "skip_connection.weight" in p:
        weight = p["skip_connection.weight"]
        skip = F.conv2d(
            x, weight, p["skip_connection.bias"], padding=weight.shape[-1] // 2
        )
    else:
        skip = x
    return skip, branch


def _assert_branch_close(out, skip, branch):
    """
    out = skip + branch, with the branch (the part that can go wrong) matched to
    1e-4 of its size; float32 rounding of the skip (~1e-7 of its size) must stay
    far below that.
    """
    assert branch.abs().max() > 1e-2 * skip.abs().max(), "the branch is too small"
    th.testing.assert_close(
        out.double() - skip, branch, rtol=1e-4, atol=1e-4 * branch.abs().max().item()
    )


@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize(
    "kind,out_channels,size",
    [("plain", 32, 8), ("wider", 64, 8), ("up", 32, 16), ("down", 32, 4)],
)
def test_resblock_matches_hand_computation(scale_shift, kind, out_channels, size):
    """A randomised ResBlock computes the written-out ResBlock of guided-diffusion."""
    block = ResBlock(
        32,
        16,
        dropout=0.0,
        out_channels=out_channels,
        use_scale_shift_norm=scale_shift,
        up=kind == "up",
        down=kind == "down",
    )
    randomize_(block, seed=8, std=0.2)
    gen = th.Generator().manual_seed(8)
    x = th.randn(2, 32, 8, 8, generator=gen)
    emb = th.randn(2, 16, generator=gen)
    with th.no_grad():
        out = block(x, emb)
    assert out.shape == (2, out_channels, size, size)
    _assert_branch_close(out, *_resblock_reference(block, x, emb))


def test_upsample_and_downsample():
    """
    Without convolutions: nearest doubling and 2x2 average pooling; with them: a
    padded 3x3 convolution after the doubling, a stride-2 padded 3x3 convolution.
    """
    x = th.randn(2, 32, 8, 8)
    th.testing.assert_close(
        Upsample(32, use_conv=False)(x),
        F.interpolate(x, scale_factor=2, mode="nearest"),
    )
    th.testing.assert_close(Downsample(32, use_conv=False)(x), F.avg_pool2d(x, 2))
    up = Upsample(32, use_conv=True, out_channels=64)
    down = Downsample(32, use_conv=True, out_channels=64)
    with th.no_grad():
        doubled = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        th.testing.assert_close(
            up(x), F.conv2d(doubled, up.conv.weight, up.conv.bias, padding=1)
        )
        th.testing.assert_close(
            down(x),
            F.conv2d(x, down.op.weight, down.op.bias, stride=2, padding=1),
        )
    assert up(x).shape == (2, 64, 16, 16)
    assert down(x).shape == (2, 64, 4, 4)
    # The strided convolution sits where guided-diffusion's checkpoints expect it.
    assert down.op.stride == (2, 2) and up.conv.weight.shape == (64, 32, 3, 3)


# ---------------------------------------------------------------- nn helpers


@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_matches_hand_computation(dim):
    t = th.tensor([0.0, 1.0, 17.5, 999.0])
    emb = gnn.timestep_embedding(t, dim)
    half = dim // 2
    expected = th.zeros(4, dim, dtype=th.float64)
    for row, step in enumerate(t.double().tolist()):
        for i in range(half):
            freq = 10000.0 ** (-i / half)
            expected[row, i] = math.cos(step * freq)
            expected[row, half + i] = math.sin(step * freq)
    assert emb.shape == (4, dim)
    # float32 arguments near 1000 rad carry ~6e-5 of rounding
    th.testing.assert_close(emb.double(), expected, rtol=0, atol=2e-4)
    th.testing.assert_close(
        gnn.timestep_embedding(t, 8, max_period=100)[:, 1].double(),
        th.cos(t.double() * 100.0 ** (-1 / 4)),
        rtol=0,
        atol=2e-4,
    )


@pytest.mark.parametrize("dtype", [th.float16, th.bfloat16])
def test_normalization_is_groupnorm32_computed_in_float32(dtype):
    norm = gnn.normalization(64)
    assert isinstance(norm, th.nn.GroupNorm) and norm.num_groups == 32
    randomize_(norm, seed=9)
    x = (th.randn(2, 64, 4, 4) * 50 + 100).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    expected = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float())
    if dtype == th.float16:
        th.testing.assert_close(out, expected.to(dtype), rtol=0, atol=0)
    else:
        # bfloat16 on the CPU: PyTorch's mixed kernel, float32 inside, rounded once:
        # at most one bfloat16 step (2^-7 relative) from rounding the float32 result.
        th.testing.assert_close(out.float(), expected, rtol=2**-7, atol=1e-30)


def test_bfloat16_groupnorm_gradients_match_the_float32_computation():
    norm = gnn.normalization(64)
    randomize_(norm, seed=9)
    x = (th.randn(2, 64, 8, 8) * 50 + 100).to(th.bfloat16)
    grad_out = th.randn(2, 64, 8, 8).to(th.bfloat16)
    fast = x.clone().requires_grad_()
    norm(fast).backward(grad_out)
    fast_weight_grad = norm.weight.grad.clone()
    norm.zero_grad()
    slow = x.float().requires_grad_()
    F.group_norm(slow, 32, norm.weight, norm.bias).backward(grad_out.float())
    rel = (fast.grad.float() - slow.grad).norm() / slow.grad.norm()
    assert rel < 2**-7
    th.testing.assert_close(fast_weight_grad, norm.weight.grad, rtol=1e-2, atol=1e-3)


def test_zero_module_and_mean_flat():
    conv = th.nn.Conv2d(3, 4, 3)
    assert gnn.zero_module(conv) is conv
    assert all(th.all(p == 0) for p in conv.parameters())
    x = th.arange(24.0).view(2, 3, 4)
    th.testing.assert_close(gnn.mean_flat(x), th.tensor([5.5, 17.5]))


def test_randomize_reaches_every_parameter():
    model, _ = tiny_model_and_diffusion()
    fresh = copy.deepcopy(model)
    randomize_(model, seed=10)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert not th.equal(a, b), name
        assert a.abs().max() > 0, name
