"""
Tests of the U-Net's fast paths: each must compute the same function as the
faithful default path, with the same parameters.

``use_sdpa`` routes attention through ``scaled_dot_product_attention``;
channels_last changes only the memory layout.
"""

import pytest
import torch as th
from conftest import randomize_, tiny_model_and_diffusion

from guided_diffusion import unet


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _inputs(n=2, size=32, seed=0):
    gen = th.Generator().manual_seed(seed)
    x = th.randn(n, 6, size, size, generator=gen)
    t = th.randint(0, 50, (n,), generator=gen)
    return x, t


def _pair(seed, **flags):
    """The tiny U-Net with and without use_sdpa, sharing one set of random weights."""
    slow, _ = tiny_model_and_diffusion(use_sdpa=False, **flags)
    fast, _ = tiny_model_and_diffusion(use_sdpa=True, **flags)
    randomize_(slow, seed=seed)
    fast.load_state_dict(slow.state_dict())
    return slow, fast


def _assert_same_gradients(slow, fast):
    """
    Gradients within 1e-5 over the whole parameter vector, and each parameter's
    within 1e-4. The biases of convolutions followed by a GroupNorm with one
    channel per group have a true gradient of 0 (the norm removes them): theirs
    are round-off (~1e-12), and only the whole-vector check covers them.
    """
    pairs = list(zip(slow.named_parameters(), fast.parameters()))
    whole_slow = th.cat([a.grad.flatten() for (_, a), _ in pairs])
    whole_fast = th.cat([b.grad.flatten() for _, b in pairs])
    assert _rel_err(whole_fast, whole_slow) < 1e-5
    checked = 0
    for (name, a), b in pairs:
        if a.grad.norm() > 1e-6 * whole_slow.norm():
            assert _rel_err(b.grad, a.grad) < 1e-4, name
            checked += 1
    assert checked > len(pairs) // 2


# The tiny U-Net attends at 16x16 with 64 channels: 1 or 4 heads of 64 or 16
# channels, in both head orders.
ATTENTION_FLAGS = [
    pytest.param(dict(num_heads=1), id="legacy-1-head"),
    pytest.param(dict(num_heads=4), id="legacy-4-heads"),
    pytest.param(dict(num_heads=1, num_head_channels=16), id="legacy-head-channels"),
    pytest.param(dict(num_heads=1, use_new_attention_order=True), id="new-1-head"),
    pytest.param(dict(num_heads=4, use_new_attention_order=True), id="new-4-heads"),
    pytest.param(
        dict(num_heads=1, num_head_channels=16, use_new_attention_order=True),
        id="new-head-channels",
    ),
]


@pytest.mark.parametrize("flags", ATTENTION_FLAGS)
def test_sdpa_attention_computes_the_same_function_and_gradients(flags):
    slow, fast = _pair(seed=11, **flags)
    x, t = _inputs()
    outputs = []
    for model in (slow, fast):
        out = model(x, t)
        out.square().mean().backward()
        outputs.append(out.detach())
    assert outputs[0].abs().max() > 0
    assert _rel_err(outputs[1], outputs[0]) < 1e-5
    _assert_same_gradients(slow, fast)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused-layout", "fused-layout"])
@pytest.mark.parametrize("heads", [1, 4])
def test_both_sdpa_layouts_compute_the_same_function_and_gradients(
    monkeypatch, fused, heads
):
    # The tiny U-Net attends over 256 positions: with the threshold moved either
    # way, every attention block takes the chosen layout.
    monkeypatch.setattr(unet, "FUSED_ATTENTION_MIN_LENGTH", 1 if fused else 10**9)
    calls = []
    sdpa = unet.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        calls.append((q.dim(), q.stride(-1)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(unet.F, "scaled_dot_product_attention", recording_sdpa)
    slow, fast = _pair(seed=11, num_heads=heads)
    x, t = _inputs()
    outputs = []
    for model in (slow, fast):
        out = model(x, t)
        out.square().mean().backward()
        outputs.append(out.detach())
    assert calls and all(call == ((4, 1) if fused else (3, 16 * 16)) for call in calls)
    assert _rel_err(outputs[1], outputs[0]) < 1e-5
    _assert_same_gradients(slow, fast)


def test_attention_is_visible_at_the_tolerance_of_the_equivalence_test():
    # With 0.05-scale weights the attention could be too flat to matter; the two
    # head orders must give outputs far apart compared with 1e-5, or the
    # equivalence test above could not see a wrong reshape.
    legacy, _ = _pair(seed=11, num_heads=4)
    new, _ = tiny_model_and_diffusion(num_heads=4, use_new_attention_order=True)
    new.load_state_dict(legacy.state_dict())
    x, t = _inputs()
    with th.no_grad():
        assert _rel_err(new(x, t), legacy(x, t)) > 1e-4


def test_use_sdpa_keeps_the_state_dict():
    slow, fast = _pair(seed=12)
    slow_shapes = {k: tuple(v.shape) for k, v in slow.state_dict().items()}
    fast_shapes = {k: tuple(v.shape) for k, v in fast.state_dict().items()}
    assert list(fast_shapes) == list(slow_shapes)
    assert fast_shapes == slow_shapes
    modules = [m for m in fast.modules() if hasattr(m, "use_sdpa")]
    assert modules and all(m.use_sdpa for m in modules)


def test_sdpa_in_an_fp16_body_matches_fp32():
    reference, _ = _pair(seed=13)
    half, _ = tiny_model_and_diffusion(use_sdpa=True, use_fp16=True)
    half.load_state_dict(reference.state_dict())
    half.convert_to_fp16()
    x, t = _inputs()
    with th.no_grad():
        expected = reference(x, t)
        out = half(x, t)
    assert out.dtype == th.float32
    assert _rel_err(out, expected) < 1e-2


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_channels_last_model_matches_contiguous(use_sdpa):
    reference, _ = _pair(seed=14)
    model, _ = tiny_model_and_diffusion(use_sdpa=use_sdpa)
    model.load_state_dict(reference.state_dict())
    model = model.to(memory_format=th.channels_last)
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=th.channels_last)
    x, t = _inputs()
    x_cl = x.to(memory_format=th.channels_last)
    assert not x_cl.is_contiguous()
    with th.no_grad():
        expected = reference(x, t)
        out = model(x_cl, t)
    assert _rel_err(out, expected) < 1e-5


# The faithful path writes its element-wise steps into the norm and convolution
# outputs they follow (fewer fresh 32-64 MiB activations at 256 px). These check
# that this is only a memory optimisation: the same numbers and gradients as the
# original's out-of-place expressions, and no input or shared tensor overwritten.


def _out_of_place_resblock(block, x, emb):
    """ResBlock._forward as the original writes it, every step out of place."""
    norm_in, conv_in = block.in_layers[0], block.in_layers[2]
    h = conv_in(block.h_upd(th.nn.functional.silu(norm_in(x))))
    x = block.x_upd(x)
    emb_out = block.emb_layers(emb)[..., None, None]
    norm_out, conv_out = block.out_layers[0], block.out_layers[3]
    if block.use_scale_shift_norm:
        scale, shift = th.chunk(emb_out, 2, dim=1)
        h = norm_out(h) * (1 + scale) + shift
    else:
        h = norm_out(h + emb_out)
    return block.skip_connection(x) + conv_out(th.nn.functional.silu(h))


@pytest.mark.parametrize("use_scale_shift_norm", [True, False])
@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(out_channels=96), dict(up=True), dict(down=True)],
    ids=["same-channels", "wider", "up", "down"],
)
def test_in_place_resblock_matches_the_out_of_place_original(
    use_scale_shift_norm, kwargs
):
    block = unet.ResBlock(
        64, 128, 0.0, use_scale_shift_norm=use_scale_shift_norm, **kwargs
    )
    randomize_(block, seed=21)
    gen = th.Generator().manual_seed(21)
    x0, emb0 = th.randn(2, 64, 8, 8, generator=gen), th.randn(2, 128, generator=gen)
    grad_out = None
    results = []
    for forward in (block, lambda x, emb: _out_of_place_resblock(block, x, emb)):
        block.zero_grad()
        x, emb = x0.clone().requires_grad_(), emb0.clone().requires_grad_()
        out = forward(x, emb)
        if grad_out is None:
            grad_out = th.randn(out.shape, generator=gen)
        out.backward(grad_out)
        assert th.equal(x, x0) and th.equal(emb, emb0)  # inputs untouched
        grads = [p.grad.clone() for p in block.parameters()]
        results.append((out.detach(), x.grad, emb.grad, grads))
    (out, x_grad, emb_grad, grads), expected = results
    assert th.equal(out, expected[0])
    assert th.equal(x_grad, expected[1]) and th.equal(emb_grad, expected[2])
    assert all(th.equal(a, b) for a, b in zip(grads, expected[3]))


def test_in_place_attention_block_matches_the_out_of_place_original():
    block = randomize_(unet.AttentionBlock(64, num_heads=4), seed=22)
    x0 = th.randn(2, 64, 8, 8, generator=th.Generator().manual_seed(22))
    x = x0.clone().requires_grad_()
    out = block(x)
    assert th.equal(x, x0)
    flat = x0.reshape(2, 64, -1)
    h = block.proj_out(block.attention(block.qkv(block.norm(flat))))
    assert th.equal(out, (flat + h).reshape(x0.shape))


def test_in_place_residual_keeps_the_wider_dtype_of_the_plain_sum():
    # Under bfloat16 autocast the block's own output is bfloat16; added to a
    # float32 input, the sum is float32 and must not be rounded into bfloat16.
    block = randomize_(unet.AttentionBlock(64, num_heads=4), seed=23)
    x = th.randn(2, 64, 8, 8, generator=th.Generator().manual_seed(23))
    with th.no_grad(), th.autocast("cpu", dtype=th.bfloat16):
        out = block(x)
        flat = x.reshape(2, 64, -1)
        h = block.proj_out(block.attention(block.qkv(block.norm(flat))))
        expected = (flat + h).reshape(x.shape)
    assert out.dtype == expected.dtype == th.float32
    assert th.equal(out, expected)
