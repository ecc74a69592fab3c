"""Many cuts in one pass (#13 item 2): each per-cut output equals the single-cut extractor,
bit for bit, from one run of the base."""
import numpy as np
import pytest
import timm
import torch

from transferlab.errors import ConfigError, CutError
from transferlab.models.builtin import lenet
from transferlab.models.extractor import build_extractor
from transferlab.models.fusion import fold_batchnorm
from transferlab.models.multicut import (
    ConcatCuts,
    block_names,
    build_multi_extractor,
    cut_dirs,
    expand_cuts,
    is_multi_cut,
    make_multi_extractor,
)

CASES = [
    # CNN: stages, a conv inside a block, the stem's in-place activation, the head
    ("test_resnet", "auto", ["stage:1", "stage:3", "layer:layer2.0.conv1", "layer:act1", "head"],
     None),
    ("test_resnet", "auto", ["stage:-1", "stage:2", "head"], {"stage:2": "max", "head": "avg"}),
    # ViT: token sequences pooled per cut, the pre-logits head
    ("test_vit", "auto", ["stage:1", "stage:3", "stage:5", "head"], ["token", "avg", "none", None]),
    ("test_vit", "auto", ["stage:0", "head"], "none"),
    # Sequential: first:N, drop:N, a named layer, the head (classifier dropped, avg pool)
    ("lenet", "auto", ["first:1", "first:3", "layer:4", "drop:3", "head"], None),
    # torchvision: bn1 is followed by an in-place ReLU, relu is called several times
    ("resnet18", "torchvision", ["layer:bn1", "layer:relu", "layer:layer2", "head"], None),
]


def pools_of(cuts, pool):
    if isinstance(pool, list):
        return pool
    return [pool.get(c) if isinstance(pool, dict) else pool for c in cuts]


def single(name, source, cut, pool):
    torch.manual_seed(0)  # the same random-init weights as the multi-cut build
    return build_extractor(name, cut=cut, pool=pool, source=source)


def multi(name, cuts, pool=None, source="auto"):
    torch.manual_seed(0)
    return build_multi_extractor(name, cuts, pool, source=source)


@pytest.mark.parametrize("name, source, cuts, pool", CASES)
def test_each_cut_equals_the_single_cut_extractor(name, source, cuts, pool):
    built = multi(name, cuts, pool, source)
    x = torch.randn(2, *built.spec.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = built.extractor(x)
    assert [str(c) for c in built.extractor.cuts] == cuts and len(outs) == len(cuts)
    for cut, p, out, dim in zip(cuts, pools_of(cuts, pool), outs, built.extractor.feature_dims):
        ref = single(name, source, cut, p)
        with torch.no_grad():
            want = ref.extractor(x)
        assert torch.equal(out, want), cut
        assert dim == ref.extractor.feature_dim, cut
        assert built.spec == ref.spec


def counting(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("name, cuts, stem, deepest_unused", [
    ("test_resnet", ["stage:1", "stage:2"], "conv1", "layer4"),
    ("test_resnet", ["stage:1", "head"], "conv1", None),
    ("test_vit", ["stage:0", "stage:2", "head"], "patch_embed", None),
    ("test_vit", ["stage:0", "stage:2"], "patch_embed", "blocks.3"),
])
def test_the_base_runs_once_per_batch_and_stops_after_the_deepest_cut(name, cuts, stem,
                                                                        deepest_unused):
    built = multi(name, cuts)
    model = built.extractor.model
    stem_calls = counting(model.get_submodule(stem))
    deep_calls = counting(model.get_submodule(deepest_unused or stem))
    x = torch.randn(3, *built.spec.input_size)
    with torch.no_grad():
        for _ in range(2):
            assert len(built.extractor(x)) == len(cuts)
    assert len(stem_calls) == 2  # one pass per batch, whatever the number of cuts
    if deepest_unused:
        assert deep_calls == []  # StopForward after the deepest cut


def test_lenet_runs_its_layers_once():
    torch.manual_seed(0)
    net = lenet()
    ext = make_multi_extractor(net, ["first:1", "first:7", "head"], None, (1, 28, 28), "lenet")
    first, last = counting(net[0]), counting(net[9])
    with torch.no_grad():
        ext(torch.randn(4, 1, 28, 28))
    assert len(first) == 1 and last == []  # the classifier never runs
    assert ext.feature_dims == [20 * 24 * 24, 800, 800]


def test_all_stages_gives_one_cut_per_stage():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet").eval()
    specs = expand_cuts(model, "all-stages", "test_resnet")
    assert [str(s) for s in specs] == [f"stage:{i}" for i in range(len(model.feature_info))]
    built = multi("test_resnet", "all-stages")
    widths = [e["num_chs"] for e in built.extractor.model.feature_info]
    assert [s[0] for s in built.extractor.output_shapes] == widths
    # a set expands in place inside a list
    assert [str(s) for s in expand_cuts(model, ["head", "all-stages"])][:2] == ["head", "stage:0"]


def test_all_blocks_on_cnn_convnext_and_vit():
    assert block_names(timm.create_model("test_resnet")) == [
        "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert block_names(timm.create_model("test_vit")) == [f"blocks.{i}" for i in range(6)]
    convnext = block_names(timm.create_model("test_convnext"))
    assert convnext[:3] == ["stages.0.blocks.0", "stages.1.blocks.0", "stages.1.blocks.1"]
    built = multi("test_convnext", "all-blocks")
    x = torch.randn(1, *built.spec.input_size)
    with torch.no_grad():
        outs = built.extractor(x)
    for cut, out in zip(built.extractor.cuts, outs):
        with torch.no_grad():
            assert torch.equal(out, single("test_convnext", "auto", str(cut), None).extractor(x))


@pytest.mark.parametrize("cuts, error, message", [
    ("all-stage", ConfigError, "unknown cut set 'all-stage': did you mean 'all-stages'?"),
    (["stage:1", "stage:1"], ConfigError, "cut 'stage:1' is listed twice"),
    ([], ConfigError, "empty list"),
    (["stage:1", "frist:2"], CutError, "did you mean 'first'"),
])
def test_bad_cut_lists_are_one_line_errors(cuts, error, message):
    model = timm.create_model("test_resnet")
    with pytest.raises(error) as err:
        expand_cuts(model, cuts, "test_resnet")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("cut_set", ["all-stages", "all-blocks"])
def test_cut_sets_on_a_model_without_stages_name_the_fix(cut_set):
    with pytest.raises(ConfigError) as err:
        multi("lenet", cut_set)
    msg = str(err.value)
    assert f"'{cut_set}' needs a timm model with feature_info; lenet has none" in msg
    assert "list the cuts instead" in msg and "\n" not in msg


def test_pool_lists_and_mappings_are_checked():
    with pytest.raises(ConfigError, match="2 pools for 3 cuts"):
        multi("test_resnet", ["stage:1", "stage:2", "head"], ["avg", "max"])
    with pytest.raises(ConfigError, match=r"names cut\(s\) stage:4 that model.cut does not have"):
        multi("test_resnet", ["stage:1", "head"], {"stage:4": "avg"})
    with pytest.raises(ConfigError, match="unknown pool 'mean'"):
        multi("test_resnet", ["stage:1", "head"], ["mean", None])


def test_cuts_that_cannot_share_a_pass_are_refused():
    # a torch.fx graph node is not a module: no hook can capture it
    with pytest.raises(CutError, match="torch.fx graph node"):
        multi("resnet18", ["layer:layer2.1.add", "head"], source="torchvision")
    # the head cut with a pool replaces avgpool, which the single-cut layer:avgpool reads
    with pytest.raises(CutError, match="'avgpool' is a module the head cut replaces"):
        multi("resnet18", ["layer:avgpool", "head"], "max", source="torchvision")


def test_directory_names_are_safe_and_unique():
    assert cut_dirs(["stage:1", "stage:-1", "head", "first:7"]) == [
        "stage-1", "stage--1", "head", "first-7"]
    assert cut_dirs(["layer:a/b", "layer:a\\b", "layer:Conv", "layer:conv"]) == [
        "layer-a_b", "layer-a_b-2", "layer-Conv", "layer-conv-2"]
    assert is_multi_cut(["head"]) and is_multi_cut("all-blocks") and not is_multi_cut("head")


def test_frozen_in_eval_and_flat_rows_split_back():
    built = multi("test_resnet", ["stage:2", "head"])
    ext = built.extractor
    ext.train()
    assert not any(m.training for m in ext.modules())
    assert not any(p.requires_grad for p in ext.parameters())
    flat = ConcatCuts(ext)
    x = torch.randn(2, *built.spec.input_size)
    with torch.no_grad():
        outs, rows = ext(x), flat(x)
    assert rows.shape == (2, sum(ext.feature_dims))
    for out, part in zip(outs, flat.split(rows.numpy())):
        assert np.array_equal(part, out.flatten(1).numpy())


def test_batchnorm_folding_leaves_the_multi_cut_extractor_as_it_is():
    # fx cannot trace the hooks: fold_batchnorm keeps the model (the runner should not fold
    # multi-cut runs; a folded single-cut head differs in the last bits)
    built = multi("test_resnet", ["stage:1", "head"])
    assert fold_batchnorm(built.extractor, built.spec.input_size) is built.extractor
    flat = ConcatCuts(built.extractor)
    assert fold_batchnorm(flat, built.spec.input_size) is flat


def test_per_cut_configs_are_the_single_cut_configs():
    from transferlab.config import ModelConfig
    from transferlab.models.multicut import multi_extractor_from_config, per_cut_configs

    cfg = ModelConfig(name="test_resnet")
    torch.manual_seed(0)
    bundle = multi_extractor_from_config(cfg, None, ["stage:1", "head"], {"head": "max"})
    configs = per_cut_configs(cfg, bundle.extractor)
    assert [(c.cut, c.pool, c.name) for c in configs] == [
        ("stage:1", None, "test_resnet"), ("head", "max", "test_resnet")]
    assert bundle.dirs == ["stage-1", "head"]
