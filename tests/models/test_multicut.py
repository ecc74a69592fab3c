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
    MultiCutExtractor,
    block_names,
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
    return build_extractor(name, cut=cuts, pool=pool, source=source)


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


def test_frozen_in_eval_and_the_engine_gives_one_array_per_cut():
    from transferlab.models.engine import FeatureComputer
    from transferlab.runtime.device import Runtime

    built = multi("test_resnet", ["stage:2", "head"])
    ext = built.extractor
    ext.train()
    assert not any(m.training for m in ext.modules())
    assert not any(p.requires_grad for p in ext.parameters())
    compute = FeatureComputer(ext, built.spec, Runtime(torch.device("cpu"), "fp32", False, 0, 1))
    images = torch.randint(0, 256, (2, *built.spec.input_size), dtype=torch.uint8)
    rows = compute(images)
    with torch.no_grad():
        outs = ext(compute.normalize(images))
    assert [r.shape for r in rows] == [(2, d) for d in ext.feature_dims]
    for out, part in zip(outs, rows):
        assert np.array_equal(part, out.flatten(1).numpy())


def test_one_builder_a_string_cut_gives_a_tensor_a_list_gives_a_list():
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    one = build_extractor("test_resnet", cut="head").extractor
    torch.manual_seed(0)
    listed = build_extractor("test_resnet", cut=["head"]).extractor  # a list of one
    with torch.no_grad():
        a, b = one(x), listed(x)
    assert isinstance(a, torch.Tensor) and isinstance(b, list) and len(b) == 1
    assert isinstance(listed, MultiCutExtractor) and torch.equal(a, b[0])
    assert [(str(o.cut), o.pool, o.pool_after_cut, o.shape) for o in one.outputs] == \
        [(str(o.cut), o.pool, o.pool_after_cut, o.shape) for o in listed.outputs]
    assert one.feature_dims == listed.feature_dims == [a.shape[1]]


def test_batchnorm_folding_leaves_the_multi_cut_extractor_as_it_is():
    # fx cannot trace the hooks: fold_batchnorm keeps the model (the runner should not fold
    # multi-cut runs; a folded single-cut head differs in the last bits)
    built = multi("test_resnet", ["stage:1", "head"])
    assert fold_batchnorm(built.extractor, built.spec.input_size) is built.extractor


def test_each_cut_store_records_the_single_cut_config():
    from pathlib import Path

    from transferlab.config import ExtractConfig, ModelConfig, OutputConfig
    from transferlab.extract.cutstore import cut_stores
    from transferlab.models.extractor import extractor_from_config

    model = ModelConfig(name="test_resnet", cut=["stage:1", "head"], pool={"head": "max"})
    cfg = ExtractConfig(model=model, output=OutputConfig(dir="out"))
    torch.manual_seed(0)
    bundle = extractor_from_config(cfg.model)
    stores = cut_stores(cfg, bundle, multi=True)
    assert [(s.cfg.model.cut, s.cfg.model.pool, s.cfg.model.name) for s in stores] == [
        ("stage:1", None, "test_resnet"), ("head", "max", "test_resnet")]
    assert [s.dir for s in stores] == [Path("out/stage-1"), Path("out/head")]
    assert bundle.dirs == ["stage-1", "head"]
    [one] = cut_stores(cfg, bundle, multi=False)  # one cut: output.dir, the config as given
    assert one.dir == Path("out") and one.cfg is cfg
