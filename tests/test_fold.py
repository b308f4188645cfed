"""ptd.models.fold: the folded teacher computes what the teacher computes, without BatchNorm."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ptd.models import build_model
from ptd.models.fold import fold_batchnorm


def _trained_stats(m: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial statistics, as a trained teacher has (fresh ones are identity)."""
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    return m


@pytest.mark.parametrize("arch,kw", [("vgg", {"plan": [8, "M", 16, 16]}), ("resnet20", {}), ("mobilenetv2", {}), ("wrn16_1", {})])
def test_folded_model_matches_in_eval_mode(arch, kw):
    torch.manual_seed(0)
    m = _trained_stats(build_model(arch, num_classes=10, **kw)).to(memory_format=torch.channels_last)
    f = fold_batchnorm(m)
    assert m.training  # the original is left as it was
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    m.eval()
    with torch.no_grad():
        ref, out = m(x), f(x)
    assert torch.allclose(ref, out, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    before = sum(isinstance(q, nn.BatchNorm2d) for q in m.modules())
    after = sum(isinstance(q, nn.BatchNorm2d) for q in f.modules())
    # Every BN that follows a conv is gone; WRN's pre-activation BNs (BN before conv) stay.
    assert after == 0 if arch != "wrn16_1" else 0 < after < before
    assert not f.training and all(not p.requires_grad for p in f.parameters())
    conv = next(q for q in f.modules() if isinstance(q, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_untraceable_model_is_one_line_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # control flow on values: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return x

    with pytest.raises(ValueError, match="cannot fold BatchNorm into DataDependent") as ei:
        fold_batchnorm(DataDependent())
    assert "\n" not in str(ei.value)
