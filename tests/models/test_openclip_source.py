"""open_clip:ARCH[/PRETRAINED]: the image tower's cuts equal OpenCLIP's own outputs, its
preprocessing OpenCLIP's transform, its text tower encode_text (random weights, offline)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tests.helpers import photos, tiny_open_clip
from transferlab.config import ModelConfig, PreprocessConfig
from transferlab.errors import ModelError
from transferlab.models.describe import describe_cuts
from transferlab.models.extractor import build_extractor
from transferlab.models.recorded import checked_model
from transferlab.runtime.device import seed_everything

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def name() -> str:
    return tiny_open_clip()


def reference(seed: int = 0):
    """OpenCLIP's own model, built with the same seed as transferlab builds it."""
    seed_everything(seed)
    return open_clip.create_model(tiny_open_clip().split(":", 1)[1]).eval()


def pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("normalize", [False, True])
def test_head_equals_encode_image(name, normalize):
    seed_everything(0)
    extractor, _ = build_extractor(name, normalize=normalize)
    model = reference()
    x = pixels()
    with torch.no_grad():
        want = model.encode_image(x, normalize=normalize)
        got = extractor(x)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-5) == normalize


def test_block_cuts_with_token_pooling(name):
    """stage:I is visual.transformer.resblocks.I; token = class token, avg = mean of patch
    tokens, tokenavg = both; one pass for several cuts equals the single cuts."""
    model = reference()
    x = pixels()
    captured = {}
    for i, block in enumerate(model.visual.transformer.resblocks):
        block.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
    with torch.no_grad():
        model.encode_image(x)
    tokens = captured[1]
    want = {"token": tokens[:, 0], "avg": tokens[:, 1:].mean(1),
            "tokenavg": torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1)}
    for pool, value in want.items():
        seed_everything(0)
        extractor, _ = build_extractor(name, cut="stage:1", pool=pool)
        torch.testing.assert_close(extractor(x), value, atol=1e-5, rtol=1e-5)
    seed_everything(0)
    multi, _ = build_extractor(name, cut="all-blocks", pool="token")
    assert [str(o.cut) for o in multi.outputs] == ["layer:visual.transformer.resblocks.0",
                                                   "layer:visual.transformer.resblocks.1"]
    torch.testing.assert_close(multi(x)[1], want["token"], atol=1e-5, rtol=1e-5)


def test_inspect_lists_blocks_and_preprocessing(name):
    lines = describe_cuts(name)
    assert lines[0].startswith(f"{name} (open_clip), input (3, 32, 32), mean (0.48145466")
    assert "bicubic, crop_pct 1.0" in lines[0]
    text = "\n".join(lines)
    assert "stage:1 (visual.transformer.resblocks.1) 17x32" in text
    assert any(line.split()[:2] == ["head", "16"] for line in lines)
    assert "all-blocks: layer:visual.transformer.resblocks.0" in text


@pytest.mark.parametrize("window", ["image", "crop"])
def test_preprocessing_equals_open_clip(name, window):
    """OpenCLIP's eval transform (resize the short side, centre crop, its mean / std) on real
    photos: equal with the whole-image resize; within resize rounding with the crop window."""
    seed_everything(0)
    built = build_extractor(name, preprocess=PreprocessConfig(window=window))
    model = reference()
    theirs = open_clip.image_transform(model.visual.image_size, is_train=False,
                                       mean=model.visual.preprocess_cfg["mean"],
                                       std=model.visual.preprocess_cfg["std"],
                                       interpolation="bicubic", resize_mode="shortest")
    for photo in photos():
        a, b = built.transform(photo), theirs(photo)
        assert a.shape == b.shape == (3, 32, 32)
        diff = (a - b).abs().max().item()
        # normalised units: one 8-bit level is 1/255/std ~ 0.015
        assert diff < (1e-5 if window == "image" else 0.12), diff


def test_text_equals_encode_text(name):
    from transferlab.models.texttower import build_text_tower, encode_texts

    texts = ["a photo of a cat", "a drawing of a dog", "red car"]
    cfg = ModelConfig(name=name)
    seed_everything(0)
    tower = build_text_tower(cfg, {"source": "open_clip", "normalized": False})
    got = encode_texts(tower, texts, batch_size=2)
    model = reference()
    with torch.no_grad():
        want = model.encode_text(open_clip.get_tokenizer("tl-tiny-clip")(texts))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_missing_library_is_one_line(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ModelError, match=r'pip install "transferlab\[clip\]"'):
        build_extractor(name)


def test_unknown_architecture_and_missing_tag():
    tiny_open_clip()
    with pytest.raises(ModelError, match="unknown OpenCLIP architecture 'tl-tiny-clp'.*Closest: "
                                         "tl-tiny-clip"):
        build_extractor("open_clip:tl-tiny-clp")
    with pytest.raises(ModelError, match="names no pretrained weights"):
        build_extractor("open_clip:tl-tiny-clip", pretrained=True)


def test_recorded_names_trust_rules():
    """A store / checkpoint may name an OpenCLIP registry name and tag; a weights file it
    names (a path) needs trust_code, as a timm model folder does."""
    ok = checked_model(ModelConfig(name="open_clip:ViT-B-32/laion2b_s34b_b79k"), "the store",
                       False)
    assert ok.source == "open_clip"
    for path in ("open_clip:ViT-B-32//etc/weights.safetensors", "open_clip:ViT-B-32/w.bin",
                 "open_clip:local-dir:/tmp/x"):
        with pytest.raises(ModelError, match="outside|asks to build"):
            checked_model(ModelConfig(name=path), "the store", False)
        assert checked_model(ModelConfig(name=path), "the store", True).source == "open_clip"


def test_random_weights_are_seeded(name):
    """Two builds with one seed are one model (a store's text tower rebuilt later pairs)."""
    outs = []
    for _ in range(2):
        seed_everything(3)
        extractor, _ = build_extractor(name)
        outs.append(extractor(pixels()).detach().numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def test_timm_tower_head_and_blocks(tmp_path):
    """A tower OpenCLIP builds from timm (as its SigLIP / EVA configs): head = encode_image,
    blocks = the timm trunk's blocks, pooled past its own prefix tokens."""
    import json

    path = tmp_path / "tl-tiny-timm-clip.json"
    path.write_text(json.dumps({
        "embed_dim": 16, "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": "test_vit",
                       "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear"},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1}}))
    open_clip.add_model_config(path)
    x = pixels(2)
    seed_everything(0)
    head, _ = build_extractor("open_clip:tl-tiny-timm-clip")
    seed_everything(0)
    model = open_clip.create_model("tl-tiny-timm-clip").eval()
    with torch.no_grad():
        torch.testing.assert_close(head(x), model.encode_image(x), atol=1e-5, rtol=1e-5)
        tokens = model.visual.trunk.blocks[1](model.visual.trunk.blocks[0](
            model.visual.trunk.norm_pre(model.visual.trunk._pos_embed(
                model.visual.trunk.patch_embed(x)))))
    seed_everything(0)
    blocks, _ = build_extractor("open_clip:tl-tiny-timm-clip", cut="all-blocks", pool="avg")
    assert str(blocks.outputs[0].cut) == "layer:visual.trunk.blocks.0"
    prefix = model.visual.trunk.num_prefix_tokens
    torch.testing.assert_close(blocks(x)[1], tokens[:, prefix:].mean(1), atol=1e-5, rtol=1e-5)


def test_local_weights_file_as_pretrained(name, tmp_path):
    """open_clip:ARCH//path/to/file.safetensors with pretrained: true reads that file (no
    network, never unpickled) and names the weights by content."""
    from safetensors.torch import save_file

    from transferlab.models.backbones import build_backbone

    seed_everything(5)
    model = open_clip.create_model("tl-tiny-clip").eval()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    seed_everything(0)  # other random weights: only the file can make them equal
    backbone = build_backbone(ModelConfig(name=f"{name}/{path}", pretrained=True))
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(x), model.encode_image(x), atol=1e-5,
                                   rtol=1e-5)
    assert set(backbone.weights_digest) == {"state_sha256"}


def test_attention_runs_on_contiguous_inputs_with_the_same_values(name):
    """The tower's batch-first attention runs as ContiguousAttention (under CPU bf16 autocast
    the transposed view made OpenCLIP's ViT-B/16 ten times slower): the same embedding in
    fp32 and under bf16 autocast."""
    from transferlab.models.openclip_source import ContiguousAttention

    seed_everything(0)
    extractor, _ = build_extractor(name)
    model = reference()
    attention = [m for m in extractor.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attention and all(type(m) is ContiguousAttention for m in attention)
    assert not any(type(m) is ContiguousAttention for m in model.modules())
    x = pixels()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model.encode_image(x).float()
        got = extractor(x).float()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    with torch.inference_mode():
        torch.testing.assert_close(extractor(x), model.encode_image(x), atol=1e-5, rtol=1e-5)
