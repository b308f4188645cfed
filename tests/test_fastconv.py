"""ptd.train.fastconv: the GEMM weight gradient equals aten's, is used exactly where its limits say,
and leaves no trace on the model outside the block."""
import copy

import pytest
import torch
import torch.nn as nn

import ptd.train.fastconv as fc
from ptd.config import OptimConfig
from ptd.data import Split, make_loader
from ptd.train.fastconv import small_image_wgrad, weight_grad
from ptd.train.loop import Runtime, fit

EVERYWHERE = {torch.float64: 10**9, torch.float32: 10**9, torch.bfloat16: 10**9}


def aten_grads(conv, x):
    x = x.detach().requires_grad_()
    out = conv(x)
    dy = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)  # not symmetric in any axis
    return out, torch.autograd.grad(out, [x, conv.weight] + ([conv.bias] if conv.bias is not None else []), dy)


@pytest.mark.parametrize("cin,cout,k,stride,pad,hw,bias", [
    (3, 5, 3, 1, 1, (2, 2), True),
    (4, 6, 3, 2, 1, (5, 7), False),   # strided, rectangular input
    (4, 6, 1, 1, 0, (3, 3), True),    # 1x1
    (2, 3, 3, 1, 0, (4, 4), True),    # no padding
    (3, 4, 5, 1, 2, (2, 3), False),   # kernel larger than the image
    (3, 4, (1, 3), (1, 2), (0, 1), (3, 6), True),  # rectangular kernel, stride and padding
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_grad_equals_aten_in_float64(cin, cout, k, stride, pad, hw, bias, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, pad, bias=bias).double()
    x = torch.randn(3, cin, *hw, dtype=torch.float64)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    out_ref, ref = aten_grads(conv, x)
    with small_image_wgrad(conv, limits=EVERYWHERE) as n:
        assert n == 1
        out, got = aten_grads(conv, x)
    assert torch.equal(out, out_ref)  # the forward is aten's, untouched
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    # the function itself, called directly
    dy = torch.ones_like(out_ref)
    gw = torch.autograd.grad(conv(x), conv.weight, dy)[0]
    s = conv.stride
    torch.testing.assert_close(weight_grad(dy, x, conv.weight.shape, s, conv.padding), gw, rtol=1e-12, atol=1e-12)


def test_used_exactly_where_the_output_is_small_enough(monkeypatch):
    calls = []
    monkeypatch.setattr(fc, "weight_grad", lambda *a: calls.append(1) or weight_grad(*a))
    conv = nn.Conv2d(4, 4, 3, padding=1).double()
    for hw, limit, used in [((3, 3), 9, True), ((3, 3), 8, False), ((2, 4), 8, True), ((4, 4), 9, False)]:
        calls.clear()
        with small_image_wgrad(conv, limits={torch.float64: limit}):
            conv(torch.randn(2, 4, *hw, dtype=torch.float64)).sum().backward()
        assert bool(calls) == used, (hw, limit)
    # dtypes without a limit, and no-grad forwards, keep aten's path
    calls.clear()
    with small_image_wgrad(conv, limits={torch.float32: 10**9}):
        conv(torch.randn(2, 4, 2, 2, dtype=torch.float64)).sum().backward()
        with torch.no_grad():
            conv(torch.randn(2, 4, 2, 2, dtype=torch.float64))
    assert not calls
    # a dtype mismatch without autocast still fails as conv2d fails, not silently cast
    with small_image_wgrad(conv, limits=EVERYWHERE), pytest.raises(RuntimeError):
        conv(torch.randn(2, 4, 2, 2, dtype=torch.float32, requires_grad=True))
    assert not calls


def test_default_limits_as_measured():
    # bf16: 4x4 and smaller; fp32: 2x2 and smaller (benchmarks/conv_wgrad.py); nothing else
    assert fc.MAX_OUT_PIXELS == {torch.bfloat16: 16, torch.float32: 4}


class SubConv(nn.Conv2d):
    pass


def test_only_plain_convs_are_patched_and_the_patch_leaves_no_trace():
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),                        # patched
        nn.Conv2d(4, 4, 3, padding=1, groups=2),              # grouped: no
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),            # dilated: no
        nn.Conv2d(4, 4, 3, padding="same"),                   # string padding: no
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),  # not zero padding: no
        SubConv(4, 4, 3, padding=1),                          # a subclass may override forward: no
        nn.Conv2d(4, 4, 1),                                   # patched
    )
    keys = list(net.state_dict())
    with small_image_wgrad(net) as n:
        assert n == 2
        assert [("forward" in m.__dict__) for m in net] == [True, False, False, False, False, False, True]
        assert list(net.state_dict()) == keys
    assert not any("forward" in m.__dict__ for m in net.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with small_image_wgrad(net):
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in net.modules())
    with small_image_wgrad(net, enabled=False) as n:
        assert n == 0
    copy.deepcopy(net)  # nothing bound to the old instances is left to copy


def test_bf16_autocast_gradients_as_accurate_as_aten():
    """Under CPU bf16 autocast the dtypes, shapes and accuracy against an fp64 ground truth match
    aten's own bf16 weight gradient (both round the same bf16 products, summed in fp32)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 32, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(16, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    ref64 = copy.deepcopy(conv).double()
    truth = torch.autograd.grad(ref64(x.double()).square().sum(), [ref64.weight, ref64.bias])

    def grads(enabled):
        with small_image_wgrad(conv, enabled=enabled) as n, torch.autocast("cpu", dtype=torch.bfloat16):
            assert n == int(enabled)
            out = conv(x)
            assert out.dtype == torch.bfloat16
            return torch.autograd.grad(out.float().square().sum(), [conv.weight, conv.bias])

    stock, fast = grads(False), grads(True)
    for s, f, t in zip(stock, fast, truth):
        assert f.dtype == s.dtype == torch.float32 and f.shape == s.shape
        err_s = ((s.double() - t).norm() / t.norm()).item()
        err_f = ((f.double() - t).norm() / t.norm()).item()
        assert err_f < 1.1 * err_s + 1e-4, (err_f, err_s)
        assert err_f < 2e-2


def _loaders():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (128,), generator=g)
    x = torch.randint(0, 40, (128, 1, 4, 4), generator=g, dtype=torch.uint8)
    for i, c in enumerate(y):
        x[i, 0, c, :] = 220
    kw = dict(mean=(0.3,), std=(0.3,), augment=False)
    return make_loader(Split(x, y), batch_size=32, train=True, seed=0, **kw)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 4))


def test_fit_uses_it_on_cpu_and_ends_where_the_stock_kernels_do(monkeypatch):
    """fp32 fit on 4x4 images: the 2x2 conv takes the GEMM path only when fast_wgrad is on, and
    the trained weights agree with stock training to float32 rounding."""
    calls = []
    real = fc.weight_grad
    monkeypatch.setattr(fc, "weight_grad", lambda *a: calls.append(1) or real(*a))
    opt = OptimConfig(epochs=2, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4)
    nets = {}
    for on in (False, True):
        calls.clear()
        nets[on] = _net()
        fit(nets[on], _loaders(), None, opt, Runtime(quiet=True, channels_last=False, fast_wgrad=on))
        assert len(calls) == (2 * 4 if on else 0)  # one call per step (4 steps x 2 epochs), for the 2x2 conv only
        assert not any("forward" in m.__dict__ for m in nets[on].modules())
    for a, b in zip(nets[False].parameters(), nets[True].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_runtime_uses_it_on_cpu_only_and_only_when_on():
    assert Runtime(device=torch.device("cpu")).uses_fast_wgrad
    assert not Runtime(device=torch.device("cpu"), fast_wgrad=False).uses_fast_wgrad
    assert not Runtime(device=torch.device("cuda")).uses_fast_wgrad  # GPUs keep cuDNN's kernels
    with Runtime(device=torch.device("cuda")).training(_net()) as n:
        assert n == 0
