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


def test_resblock_updown_and_new_attention_order_models_run():
    x, t = _inputs()
    for flags in (dict(resblock_updown=True), dict(use_new_attention_order=True)):
        model, _ = tiny_model_and_diffusion(**flags)
        randomize_(model, seed=5)
        with th.no_grad():
            out = model(x, t)
        assert out.shape == (2, 3, 32, 32) and th.isfinite(out).all()


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


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_shapes(scale_shift):
    x = th.randn(2, 32, 8, 8)
    emb = th.randn(2, 16)
    kwargs = dict(dropout=0.0, use_scale_shift_norm=scale_shift)
    for block, size in [
        (ResBlock(32, 16, **kwargs), 8),
        (ResBlock(32, 16, up=True, **kwargs), 16),
        (ResBlock(32, 16, down=True, **kwargs), 4),
    ]:
        randomize_(block, seed=8)
        assert block(x, emb).shape == (2, 32, size, size)
    width = 64 if scale_shift else 32
    assert ResBlock(32, 16, **kwargs).emb_layers[1].weight.shape == (width, 16)


def test_upsample_and_downsample():
    x = th.randn(2, 32, 8, 8)
    th.testing.assert_close(
        Upsample(32, use_conv=False)(x),
        F.interpolate(x, scale_factor=2, mode="nearest"),
    )
    th.testing.assert_close(Downsample(32, use_conv=False)(x), F.avg_pool2d(x, 2))
    up = Upsample(32, use_conv=True, out_channels=64)
    down = Downsample(32, use_conv=True, out_channels=64)
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
