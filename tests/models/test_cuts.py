"""Cut points equal the reference outputs of timm, torchvision and a hand-run LeNet."""
import pytest
import timm
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import transferlab
from transferlab.errors import CutError
from transferlab.models.builtin import lenet
from transferlab.models.cuts import CutSpec, list_cut_points, make_extractor, parse_cut

# CNN, ViT and ConvNeXt families (and more), random weights, small inputs
TIMM_MODELS = ["test_resnet", "test_efficientnet", "test_convnext", "test_vit", "test_vit2",
               "test_byobnet", "test_nfnet"]


def timm_model(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    return model, timm.data.resolve_model_data_config(model)["input_size"]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_head_cut_equals_timm_pre_logits(name):
    model, size = timm_model(name)
    x = torch.randn(2, *size)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    extractor = make_extractor(model, "head", None, size, name)
    with torch.no_grad():
        got = extractor(x)
    assert torch.equal(got, expected)
    assert extractor.output_shape == tuple(expected.shape[1:])


def test_head_cut_with_explicit_pool_matches_timm_pooling():
    model, size = timm_model("test_resnet")
    x = torch.randn(2, *size)
    with torch.no_grad():
        feats = model.forward_features(x)
        extractor = make_extractor(model, "head", "max", size)
        assert torch.allclose(extractor(x), feats.amax(dim=(2, 3)))


def test_vit_token_and_avg_pools():
    model, size = timm_model("test_vit")
    x = torch.randn(2, *size)
    with torch.no_grad():
        tokens = model.forward_features(x)
        ext = make_extractor(model, "head", "none", size)
        assert torch.equal(ext(x), tokens)
    prefix = model.num_prefix_tokens
    ext_avg = make_extractor(timm_model("test_vit")[0], "stage:-1", "avg", size)
    m = timm_model("test_vit")[0]
    with torch.no_grad():
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        h = m.blocks(h)
        assert torch.allclose(ext_avg(x), h[:, prefix:].mean(1), atol=1e-6)


def test_layer_cut_equals_torchvision_feature_extractor():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    for name in ["layer3", "layer2.1.add", "layer4.0.relu_1"]:
        reference = create_feature_extractor(model, {name: "out"})
        extractor = make_extractor(model, f"layer:{name}", None, (3, 64, 64), "resnet18")
        with torch.no_grad():
            assert torch.equal(extractor(x), reference(x)["out"]), name


def test_first_seven_of_lenet_equals_layers_run_by_hand():
    torch.manual_seed(0)
    net = lenet()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        h = x
        for layer in list(net)[:7]:
            h = layer(h)
        extractor = make_extractor(net, "first:7", None, (1, 28, 28), "lenet")
        assert torch.equal(extractor(x), h)
    assert extractor.output_shape == (800,)
    assert make_extractor(lenet(), "drop:3", None, (1, 28, 28)).output_shape == (800,)
    assert make_extractor(lenet(), "head", None, (1, 28, 28)).output_shape == (800,)


def test_first_n_on_a_non_sequential_model_uses_call_order():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    ext = make_extractor(model, "first:5", None, (3, 64, 64))  # conv1 bn1 relu maxpool layer1
    with torch.no_grad():
        expected = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
        assert torch.equal(ext(x), expected)


def test_stage_cut_equals_timm_features_only():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet").eval()
    torch.manual_seed(0)
    features = timm.create_model("test_resnet", features_only=True, out_indices=(2,)).eval()
    features.load_state_dict({k: v for k, v in model.state_dict().items()
                              if k in features.state_dict()})
    x = torch.randn(2, 3, 64, 64)
    ext = make_extractor(model, "stage:2", None, (3, 64, 64))
    with torch.no_grad():
        assert torch.equal(ext(x), features(x)[0])
    assert make_extractor(timm.create_model("test_resnet"), "stage:-1", None,
                          (3, 64, 64)).output_shape[0] == model.feature_info[-1]["num_chs"]


def test_torchvision_head_cuts():
    resnet = make_extractor(torchvision.models.resnet18(), "head", None, (3, 64, 64))
    assert resnet.output_shape == (512,)
    # VGG: classifier removed, global average pooling like Keras include_top=False, pooling='avg'
    vgg = make_extractor(torchvision.models.vgg11(), "head", None, (3, 64, 64))
    assert vgg.output_shape == (512,)
    assert make_extractor(torchvision.models.mobilenet_v3_small(), "head", None,
                          (3, 64, 64)).output_shape == (576,)


def test_extractor_is_frozen_and_stays_in_eval():
    ext, _ = transferlab.build_extractor("test_resnet", cut="stage:1")
    assert not any(p.requires_grad for p in ext.parameters())
    ext.train()
    assert not any(m.training for m in ext.modules())


def test_parse_cut_forms():
    assert parse_cut("first:7") == CutSpec("first", 7)
    assert parse_cut({"drop": 2}) == CutSpec("drop", 2)
    assert parse_cut("layer:layer3.0") == CutSpec("layer", "layer3.0")
    assert str(parse_cut("stage:-1")) == "stage:-1"


@pytest.mark.parametrize("cut, message", [
    ("frist:7", "did you mean 'first'"),
    ("first", "needs a value"),
    ("first:x", "needs an integer"),
    ("head:2", "takes no value"),
])
def test_bad_cut_specs(cut, message):
    with pytest.raises(CutError, match=message):
        parse_cut(cut)


def test_out_of_range_first_lists_layers():
    with pytest.raises(CutError) as err:
        make_extractor(lenet(), "first:12", None, (1, 28, 28), "lenet")
    assert "has 10 layers" in str(err.value) and "first:1..10" in str(err.value)


def test_unknown_layer_lists_close_names():
    with pytest.raises(CutError) as err:
        make_extractor(torchvision.models.resnet18(), "layer:layer5", None, (3, 64, 64), "resnet18")
    assert "no layer named 'layer5'" in str(err.value)
    assert "layer4" in str(err.value)
    assert "transferlab.inspect" in str(err.value)


def test_stage_out_of_range_and_without_feature_info():
    with pytest.raises(CutError, match="stage:9 is out of range"):
        make_extractor(timm.create_model("test_resnet"), "stage:9", None, (3, 64, 64))
    with pytest.raises(CutError, match="need a timm model with feature_info"):
        make_extractor(lenet(), "stage:1", None, (1, 28, 28))


def test_token_pool_on_a_feature_map_is_refused():
    with pytest.raises(CutError, match="token"):
        make_extractor(timm.create_model("test_resnet"), "stage:1", "token", (3, 64, 64))


def test_list_cut_points_shapes():
    points = {p.spec: p.shape for p in list_cut_points(lenet(), (1, 28, 28))}
    assert points["first:7"] == (800,)
    assert points["first:3"] == (20, 12, 12)
    stages = [p for p in list_cut_points(timm.create_model("test_resnet"), (3, 64, 64))
              if p.spec.startswith("stage:")]
    assert len(stages) == len(timm.create_model("test_resnet").feature_info) == 5


def test_inspect_cli_prints_cut_points(capsys):
    from transferlab.inspect import main

    main(["lenet"])
    out = capsys.readouterr().out
    assert "first:7 (6)" in out and "800" in out


def test_inspect_shows_what_the_cut_sets_expand_to(capsys):
    from transferlab.inspect import main

    assert main(["test_resnet"]) == 0
    out = capsys.readouterr().out
    assert "all-stages: stage:0, stage:1, stage:2, stage:3, stage:4" in out
    assert "all-blocks: layer:layer1.0, layer:layer2.0" in out
    assert main(["lenet"]) == 0
    assert "all-stages" not in capsys.readouterr().out  # no feature_info: list the cuts
