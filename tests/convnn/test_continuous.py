"""CKConv2d / FlexConv2d against CCNN's definitions (tests/convnn/ccnn_reference.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from convnn import CKConv2d, FlexConv2d, from_ccnn_state_dict
from convnn.continuous.functional import conv2d_fft, conv2d_spatial, crop_sizes, grid_size
from tests.convnn.ccnn_reference import CCNNConv

# name: (reference keywords, our keywords, input side)
VARIANTS = {
    "ck-magnet": (dict(flex=False, separable=False), {}, 10),
    "ck-magnet-separable": (dict(flex=False, separable=True), {}, 10),
    "ck-siren": (dict(flex=False, separable=False, kernel_type="SIREN"), {}, 10),
    "ck-siren-separable": (dict(flex=False, separable=True, kernel_type="SIREN"), {}, 10),
    "ck-same": (dict(flex=False, separable=False, size="same"), {}, 9),
    "ck-fft": (dict(flex=False, separable=False, size="full", use_fft=True), {}, 10),
    "ck-fft-separable": (dict(flex=False, separable=True, size="full", use_fft=True), {}, 10),
    "flex-crop": (dict(flex=True, separable=False, size=33, mask_init_value=0.3), {}, 10),
    "flex-crop-mean-separable": (
        dict(flex=True, separable=True, size=33, mask_init_value=0.3, learn_mean=True),
        {"mask_learn_mean": True},
        10,
    ),
    "flex-nocrop-siren": (
        dict(flex=True, separable=True, kernel_type="SIREN", dynamic_cropping=False),
        {"mask_dynamic_cropping": False},
        10,
    ),
    "flex-fft": (
        dict(flex=True, separable=False, size="full", use_fft=True, mask_init_value=0.6),
        {},
        26,
    ),
    "flex-fft-separable": (
        dict(flex=True, separable=True, size="full", use_fft=True, mask_init_value=0.6),
        {},
        26,
    ),
}


def _pair(name: str) -> tuple[CCNNConv, torch.nn.Module, int]:
    """A CCNN-layout reference with perturbed weights and our layer loaded from its state dict."""
    ref_kw, our_kw, side = VARIANTS[name]
    torch.manual_seed(0)
    ref = CCNNConv(2, 3, **ref_kw).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if ref_kw["flex"]:
            ref.mask_width_param.copy_(ref.mask_width_param * torch.tensor([1.0, 1.3]))
            if ref_kw.get("learn_mean"):
                ref.mask_mean_param.copy_(torch.tensor([0.1, -0.15]))
    cls = FlexConv2d if ref_kw["flex"] else CKConv2d
    kw = dict(
        kernel_size=ref_kw.get("size", 9),
        kernel_type=ref_kw.get("kernel_type", "MAGNet"),
        kernel_no_hidden=8,
        kernel_no_layers=3,
        kernel_omega_0=10.0,
        use_fft=ref_kw.get("use_fft", False),
        separable=ref_kw["separable"],
        **our_kw,
    )
    if ref_kw["flex"]:
        kw["mask_init_value"] = ref_kw.get("mask_init_value", 0.075)
    ours = cls(2, 3, **kw).double()
    ours.load_state_dict(from_ccnn_state_dict(ref.state_dict()), strict=True)
    return ref, ours, side


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_ccnn_weights_give_the_same_output_and_gradients(name: str) -> None:
    # Catches: a wrong key/shape mapping, kernel channel order, grid orientation, mask/crop
    # formula, Chang scaling, FFT padding, or separable handling differing from CCNN's.
    ref, ours, side = _pair(name)
    x = torch.randn(2, 2, side, side, dtype=torch.float64)
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ref, out = ref(xr), ours(xo)
    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-10)
    (out_ref * torch.linspace(-1, 1, out_ref.numel()).view_as(out_ref)).sum().backward()
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-9, atol=1e-10)
    grads = from_ccnn_state_dict({k: p.grad for k, p in ref.named_parameters()})
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[key], rtol=1e-8, atol=1e-9, msg=key)
    assert ours.conv_kernel(x).shape == ref.kernel(x).shape


def test_crop_really_happens_in_the_crop_variants() -> None:
    # Catches: a test matrix whose "crop" cases never crop, or crop both axes alike.
    _, ours, side = _pair("flex-crop")
    kh, kw = ours.conv_kernel(torch.zeros(1, 2, side, side, dtype=torch.float64)).shape[-2:]
    assert kh < kw < 33


def test_first_forward_state_loads_from_a_trained_ccnn_layer() -> None:
    # Catches: re-running Chang initialisation, or re-deciding "same", after loading CCNN state.
    torch.manual_seed(1)
    ref = CCNNConv(2, 3, flex=True, separable=True, size="same", mask_init_value=0.3).double()
    ref(torch.randn(1, 2, 9, 9, dtype=torch.float64))  # fixes the 9×9 grid, Chang-initialises
    ours = FlexConv2d(
        2, 3, "same", kernel_no_hidden=8, kernel_omega_0=10.0, separable=True, mask_init_value=0.3
    ).double()
    ours.load_state_dict(from_ccnn_state_dict(ref.state_dict()))
    x = torch.randn(2, 2, 12, 12, dtype=torch.float64)  # even: "same" is already decided
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-9, atol=1e-10)


def test_chang_initialisation_scales_the_output_layer_once() -> None:
    # Catches: scaling by the wrong fan-in (dense: in·kh·kw) or on every forward.
    torch.manual_seed(0)
    layer = CKConv2d(4, 5, kernel_size=7, kernel_no_hidden=8, kernel_omega_0=10.0)
    before = layer.kernel_net.output_linear.weight.detach().clone()
    x = torch.randn(1, 4, 7, 7)
    layer(x)
    layer(x)
    torch.testing.assert_close(
        layer.kernel_net.output_linear.weight, before * math.sqrt(1 / (4 * 49))
    )
    assert bool(layer.initialized) and int(layer.grid_side) == 7


@pytest.mark.parametrize(
    ("h", "w", "kh", "kw", "separable"),
    [(7, 10, 5, 5, False), (7, 10, 3, 9, False), (8, 8, 15, 7, True), (6, 9, 13, 17, True)],
)
def test_fft_convolution_equals_the_spatial_one_in_float64(
    h: int, w: int, kh: int, kw: int, separable: bool
) -> None:
    # Catches: FFT padding per axis (rectangular kernels), kernels wider than the map, the
    # correlation direction (conj), depthwise FFT, bias broadcasting.
    torch.manual_seed(0)
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    kernel = torch.randn(1 if separable else 4, 3, kh, kw, dtype=torch.float64)
    bias = torch.randn(3 if separable else 4, dtype=torch.float64)
    expected = conv2d_spatial(x, kernel, bias, separable)
    torch.testing.assert_close(conv2d_fft(x, kernel, bias, separable), expected)
    torch.testing.assert_close(
        conv2d_fft(x, kernel, None, separable), expected - bias.view(-1, 1, 1)
    )


def test_crop_sizes_follow_the_mask_radius() -> None:
    # Catches: a wrong root (|μ| + σ√(−2 ln t)) or rounding: CCNN-4,140's 0.075 on 33 → 5×5.
    width, mean = torch.tensor([0.075, 0.6]), torch.zeros(2)
    assert crop_sizes(33, mean, width, 0.1) == (5, 33)
    assert crop_sizes(33, torch.tensor([0.5, 0.0]), torch.tensor([0.1, 0.1]), 0.1) == (23, 7)


def test_kernel_grid_sizes() -> None:
    assert (grid_size("full", 16), grid_size("same", 15), grid_size(33, 16)) == (31, 15, 33)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (CKConv2d, {"kernel_size": 4}, "kernel_size=4 is even; a continuous kernel is centred"),
        (CKConv2d, {"kernel_size": "half"}, "kernel_size='half' is invalid; choose 'same', 'full'"),
        (CKConv2d, {"kernel_no_layers": 0}, "kernel_no_layers=0 must be an integer >= 1"),
        (CKConv2d, {"kernel_type": "SIREN", "kernel_no_layers": 1}, "kernel_no_layers=1 must be"),
        (CKConv2d, {"kernel_type": "MLP"}, "kernel_type='MLP' is invalid; choose one of"),
        (CKConv2d, {"kernel_omega_0": 0.0}, "kernel_omega_0=0.0 must be a positive number"),
        (FlexConv2d, {"mask_threshold": 1.0}, "mask_threshold=1.0 must be in (0, 1), exclusive"),
        (FlexConv2d, {"mask_threshold": 0}, "mask_threshold=0 must be in (0, 1), exclusive"),
        (FlexConv2d, {"mask_init_value": -0.1}, "mask_init_value=-0.1 must be a positive number"),
        (FlexConv2d, {"mask_temperature": 2.0}, "mask_temperature=2.0 is invalid"),
        (FlexConv2d, {"separable": 1}, "separable=1 must be true or false"),
    ],
)
def test_bad_options_are_refused_naming_the_keyword(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cls(2, 3, **kwargs)


def test_same_on_an_even_map_is_refused_at_the_first_forward() -> None:
    with pytest.raises(ValueError, match="kernel_size='same' takes the map width 8, which is even"):
        CKConv2d(2, 3, "same")(torch.zeros(1, 2, 8, 8))


def test_flop_count_includes_the_kernel_network() -> None:
    # Catches: a kernel generated outside the counted forward (cached, or by uncounted ops).
    layer = FlexConv2d(4, 6, 9, kernel_no_hidden=8, separable=True, mask_dynamic_cropping=False)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        layer(torch.zeros(1, 4, 5, 5))
    n, hidden, layers = 81, 8, 3
    kernel_net = 2 * n * (4 * 2 * hidden + layers * hidden * hidden + hidden * 4)
    conv = 2 * 4 * 25 * 81 + 2 * 4 * 6 * 25
    assert counter.get_total_flops() == kernel_net + conv


def test_mask_parameters_are_exposed_for_their_learning_rate() -> None:
    learned = FlexConv2d(2, 2, 9, mask_learn_mean=True)
    fixed = FlexConv2d(2, 2, 9)
    assert [p.shape for p in learned.mask_parameters()] == [(2,), (2,)]
    assert fixed.mask_parameters() == [fixed.mask_width]
    assert "mask_mean" in dict(fixed.named_buffers())
