"""Heads: linear / MLP construction, keeping the model's own layers, shape checks."""
import pytest
import torch
from torch import nn

from transferlab.config import HeadConfig
from transferlab.models.cuts import make_extractor, parse_cut
from transferlab.models.heads import (
    HeadError,
    build_head,
    check_head_fits,
    cut_with_head,
    keep_head,
    reinit_last_linear,
)
from transferlab.models.lenet import lenet


def test_linear_head_flattens_and_maps_to_classes():
    head = build_head(HeadConfig(type="linear"), 800, 5)
    assert [type(m) for m in head] == [nn.Flatten, nn.Linear]
    assert head(torch.zeros(3, 50, 4, 4)).shape == (3, 5)


def test_mlp_head_layers_in_order():
    head = build_head(HeadConfig(type="mlp", hidden=[16, 8], activation="gelu", dropout=0.25),
                      32, 3)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Flatten", "Dropout", "Linear", "GELU", "Dropout", "Linear", "GELU",
                     "Dropout", "Linear"]
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [16, 8, 3]


def test_mlp_without_hidden_sizes_is_refused():
    with pytest.raises(HeadError, match="needs head.hidden"):
        build_head(HeadConfig(type="mlp"), 32, 3)


def test_in_features_mismatch_names_the_cut_size():
    with pytest.raises(HeadError, match=r"head.in_features=512 does not fit the cut's output "
                                        r"of 800 features"):
        build_head(HeadConfig(in_features=512), 800, 5)


def test_keep_head_copies_layers_after_the_cut_and_reinitialises_the_last_linear():
    torch.manual_seed(0)
    model = lenet(num_classes=10)
    head = keep_head(model, parse_cut("first:7"), 7, 5)
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"]
    assert torch.equal(head[0].weight, model[7].weight)  # trained layer 8 is kept
    assert head[0].weight.data_ptr() != model[7].weight.data_ptr()  # ... as a copy
    assert head[2].out_features == 5 and model[9].out_features == 10


def test_keep_head_of_a_timm_model_uses_its_classifier():
    import timm

    model = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    base, head = cut_with_head(model, "head", None, (3, 32, 32), HeadConfig(type="keep"), 3,
                               "test_resnet")
    assert isinstance(head, nn.Linear) and head.out_features == 3
    assert head.in_features == base.feature_dim


def test_keep_head_with_a_pooled_cut_does_not_fit():
    with pytest.raises(HeadError, match=r"the head does not fit the cut's output of shape \(50,\)"):
        cut_with_head(lenet(), "first:4", "avg", (1, 28, 28), HeadConfig(type="keep"), 5)


def test_keep_head_needs_layers_after_the_cut():
    with pytest.raises(HeadError, match="no layers are left for the head"):
        cut_with_head(lenet(), "first:10", None, (1, 28, 28), HeadConfig(type="keep"), 5)


def test_keep_head_refuses_a_layer_cut():
    with pytest.raises(HeadError, match="head.type=keep needs a Sequential model"):
        cut_with_head(lenet(), "layer:3", None, (1, 28, 28), HeadConfig(type="keep"), 5)


def test_reinit_without_linear_is_an_error():
    with pytest.raises(HeadError, match="no Linear layer"):
        reinit_last_linear(nn.Sequential(nn.ReLU()), 3)


def test_check_head_fits_reports_wrong_output_size():
    base = make_extractor(lenet(), "first:7", None, (1, 28, 28))
    with pytest.raises(HeadError, match=r"not \(batch, 5\) class scores"):
        check_head_fits(nn.Linear(800, 4), base, 5)


def test_a_single_class_head_is_refused():
    with pytest.raises(HeadError, match="at least 2 classes"):
        cut_with_head(lenet(), "first:7", None, (1, 28, 28), HeadConfig(), 1)
