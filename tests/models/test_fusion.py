"""BatchNorm folding: same outputs, fewer layers, and the model untouched when unsafe."""
from __future__ import annotations

import timm
import torch
from torch import nn

from transferlab.models.fusion import fold_batchnorm


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine weights (random init has mean 0, var 1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def count(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


def test_conv_bn_pairs_are_folded_with_the_same_output():
    model = randomize_bn(timm.create_model("resnet18", pretrained=False, num_classes=0))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        want = model(x)
    folded = fold_batchnorm(model, (3, 64, 64))
    assert folded is not model and count(model, nn.BatchNorm2d) == 20
    assert count(folded, nn.BatchNorm2d) == 0
    with torch.inference_mode():
        got, again = folded(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert torch.equal(again, want)  # the original is left as it was


class SharedConvOutput(nn.Module):
    """The conv's output feeds the BatchNorm and a skip: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace this
            x = -x
        return self.bn(self.conv(x))


def test_a_conv_output_used_twice_keeps_its_batchnorm():
    model = randomize_bn(SharedConvOutput())
    folded = fold_batchnorm(model, (3, 8, 8))
    assert count(folded, nn.BatchNorm2d) == 1
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(folded(x), model(x))


def test_batchnorm_with_activation_is_not_folded():
    model = randomize_bn(timm.create_model("test_efficientnet", pretrained=False,
                                           num_classes=0))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "BatchNormAct2d" in kinds
    folded = fold_batchnorm(model, (3, 32, 32))
    assert sum(type(m).__name__ == "BatchNormAct2d" for m in folded.modules()) == \
        sum(type(m).__name__ == "BatchNormAct2d" for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_untraceable_training_or_bn_free_models_are_returned_as_they_are():
    untraceable = randomize_bn(DataDependent())
    assert fold_batchnorm(untraceable, (3, 8, 8)) is untraceable
    training = randomize_bn(SharedConvOutput()).train()
    assert fold_batchnorm(training, (3, 8, 8)) is training
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert fold_batchnorm(plain, (3, 8, 8)) is plain


def test_a_folded_copy_that_disagrees_is_refused(monkeypatch):
    import torch.fx.experimental.optimization as opt

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))

    def broken(m, inplace=False):
        return nn.Sequential(nn.Conv2d(3, 4, 3))  # another function

    monkeypatch.setattr(opt, "fuse", broken)
    assert fold_batchnorm(model, (3, 8, 8)) is model
