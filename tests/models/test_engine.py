"""The frozen-forward engine (``models.engine.FeatureComputer``): one list per batch, one
entry per model output, reduced per output, the same numbers on every entry point."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from transferlab.data.preprocess import PreprocessSpec
from transferlab.errors import ComputeError
from transferlab.models.engine import FeatureComputer
from transferlab.runtime.device import Runtime

CPU = Runtime(torch.device("cpu"), "fp32", False, 0, 1)
SPEC = PreprocessSpec((3, 8, 8), "bilinear", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 1.0, "center",
                      "center_crop")


class TwoCuts(nn.Module):
    """A conv and a BatchNorm; outputs the map after the conv and the pooled BatchNorm."""

    feature_dims = (4 * 8 * 8, 4)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.conv(x)
        return [a, self.bn(a).mean(dim=(2, 3))]


class Halve(nn.Module):
    def __init__(self, d_in: int):
        super().__init__()
        self.dim = d_in // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :self.dim] * 2


def images(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def reference(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What the engine must compute: normalised as the spec says, then the model."""
    mean, std = torch.tensor(SPEC.mean).view(1, 3, 1, 1), torch.tensor(SPEC.std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model((x.float() / 255 - mean) / std)
    return [out] if isinstance(out, torch.Tensor) else out


def test_every_output_is_one_array_of_flat_rows():
    torch.manual_seed(0)
    model, x = TwoCuts(), images()
    compute = FeatureComputer(model, SPEC, CPU)
    rows = compute(x)
    want = reference(model, x)
    assert [r.shape for r in rows] == [(3, 256), (3, 4)] and compute.out_dims == [256, 4]
    assert all(r.dtype == np.float32 for r in rows)
    for got, w in zip(rows, want):
        np.testing.assert_allclose(got, w.flatten(1).numpy(), rtol=1e-5, atol=1e-5)


def test_forward_gives_float_tensors_shaped_as_the_model_gives_them():
    torch.manual_seed(0)
    model, x = TwoCuts(), images()
    compute = FeatureComputer(model, SPEC, CPU)
    outs = compute.forward(x)
    assert [tuple(o.shape) for o in outs] == [(3, 4, 8, 8), (3, 4)]
    assert all(o.dtype == torch.float32 and o.device == CPU.device for o in outs)
    assert not any(o.requires_grad for o in outs) and torch.is_inference(outs[0])
    np.testing.assert_array_equal(outs[0].flatten(1).numpy(), compute(x)[0])


def test_a_single_tensor_model_gives_a_list_of_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    model.feature_dims = [2 * 6 * 6]
    compute = FeatureComputer(model, SPEC, CPU)
    rows = compute(images(2))
    assert len(rows) == 1 and rows[0].shape == (2, 72) and compute.out_dims == [72]
    assert len(compute.forward(images(2))) == 1


def test_reductions_apply_per_output_and_none_keeps_an_output():
    torch.manual_seed(0)
    model, x = TwoCuts(), images()
    compute = FeatureComputer(model, SPEC, CPU)
    plain = compute(x)
    compute.set_reduce([Halve(256), None])
    assert compute.out_dims == [128, 4]
    reduced = compute(x)
    np.testing.assert_array_equal(reduced[0], plain[0][:, :128] * 2)
    np.testing.assert_array_equal(reduced[1], plain[1])
    assert [o.shape[1:] for o in compute.forward(x)] == [(4, 8, 8), (4,)]  # forward: no reduce
    with pytest.raises(ValueError, match="1 reductions for 2 outputs"):
        compute.set_reduce([None])


def test_batchnorm_folding_is_recorded_and_keeps_the_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()).eval()
    model[1].running_mean.uniform_(-1, 1)
    x = images()
    plain, folded = FeatureComputer(model, SPEC, CPU), FeatureComputer(model, SPEC, CPU,
                                                                       fold_bn=True)
    assert not plain.folded and folded.folded
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    np.testing.assert_allclose(folded(x)[0], plain(x)[0], rtol=1e-4, atol=1e-5)


def test_a_several_output_model_is_folded_where_every_output_matches():
    model = TwoCuts()
    compute = FeatureComputer(model, SPEC, CPU, fold_bn=True)
    assert compute.folded  # fx traces it; both outputs were checked against the original
    np.testing.assert_allclose(compute(images())[1], FeatureComputer(model, SPEC, CPU)(
        images())[1], rtol=1e-4, atol=1e-5)


def test_inf_in_any_output_is_refused():
    model = TwoCuts()
    model.bn.running_var.zero_()
    model.bn.eps = 0.0  # division by zero: inf in the second output only
    with pytest.raises(ComputeError, match="inf/NaN features in fp32; check the weights"):
        FeatureComputer(model, SPEC, CPU)(images())
