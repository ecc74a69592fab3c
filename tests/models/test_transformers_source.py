"""hf:ORG/NAME / hf:/folder: cuts equal Transformers' own outputs (get_image_features, pooled
output, hidden states), the preprocessing equals the model's image processor on real
photos, the text tower get_text_features; crafted folders are refused in one line."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import hf_clip_folder, hf_dinov2_folder, photos
from transferlab.config import ModelConfig
from transferlab.errors import ModelError
from transferlab.models.describe import describe_cuts
from transferlab.models.extractor import build_extractor
from transferlab.models.recorded import checked_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"clip": hf_clip_folder(root / "clip"), "dino": hf_dinov2_folder(root / "dino")}


def pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def pooled(out):
    return getattr(out, "pooler_output", out)  # Transformers 5 returns the output object


def test_clip_head_equals_get_image_features(folders):
    extractor, _ = build_extractor(f"hf:{folders['clip']}")
    model = transformers.CLIPModel.from_pretrained(folders["clip"]).eval()
    x = pixels()
    with torch.no_grad():
        want = pooled(model.get_image_features(pixel_values=x))
        got = extractor(x)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_dinov2_head_pools_and_hidden_states(folders):
    """head = pooled output (class token after the final norm); avg / tokenavg pool the last
    hidden state (DINOv2's linear eval concatenates both); stage:I = hidden_states[I + 1]."""
    name = f"transformers:{folders['dino']}"
    model = transformers.Dinov2Model.from_pretrained(folders["dino"]).eval()
    x = pixels()
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    last = out.last_hidden_state
    want = {None: out.pooler_output, "avg": last[:, 1:].mean(1),
            "tokenavg": torch.cat([last[:, 0], last[:, 1:].mean(1)], 1)}
    for pool, value in want.items():
        extractor, _ = build_extractor(name, pool=pool)
        torch.testing.assert_close(extractor(x), value, atol=1e-6, rtol=1e-5)
    multi, _ = build_extractor(name, cut="all-blocks", pool="none")
    assert [str(o.cut) for o in multi.outputs] == ["layer:blocks.0", "layer:blocks.1",
                                                   "layer:blocks.2"]
    for i, value in enumerate(multi(x)):
        torch.testing.assert_close(value, out.hidden_states[i + 1], atol=1e-6, rtol=1e-5)
    stage, _ = build_extractor(name, cut="stage:-1", pool="token")
    torch.testing.assert_close(stage(x), out.hidden_states[3][:, 0], atol=1e-6, rtol=1e-5)
    text = "\n".join(describe_cuts(name))
    assert "stage:2 (blocks.2)" in text and "17x32" in text


PROCESSORS = {  # (processor, crop_pct, interpolation): the released models' settings
    "clip": (lambda: transformers.CLIPImageProcessor(), 1.0, "bicubic"),
    "dinov2": (lambda: transformers.BitImageProcessor(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]), 224 / 256, "bicubic"),
    "vit": (lambda: transformers.ViTImageProcessor(), 1.0, "bilinear"),
    "siglip": (lambda: transformers.SiglipImageProcessor(), 1.0, "bicubic"),
}


def test_siglip_and_vit_heads(tmp_path):
    """SigLIP: head = get_image_features (its attention-pool head), no class token (avg pools
    every token); ViT: head = its pooler output."""
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=32, patch_size=8)
    torch.manual_seed(0)
    siglip = transformers.SiglipModel(transformers.SiglipConfig(
        vision_config=tower, text_config=dict(hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              vocab_size=50))).eval()
    siglip.save_pretrained(tmp_path / "siglip")
    vit = transformers.ViTModel(transformers.ViTConfig(**tower)).eval()
    vit.save_pretrained(tmp_path / "vit")
    x = pixels()
    with torch.no_grad():
        want = pooled(siglip.get_image_features(pixel_values=x))
        last = siglip.vision_model(pixel_values=x).last_hidden_state
        vit_out = vit(pixel_values=x)
    head, _ = build_extractor(f"hf:{tmp_path / 'siglip'}")
    torch.testing.assert_close(head(x), want, atol=1e-6, rtol=1e-5)
    avg, _ = build_extractor(f"hf:{tmp_path / 'siglip'}", pool="avg")
    torch.testing.assert_close(avg(x), last.mean(1), atol=1e-6, rtol=1e-5)
    head, _ = build_extractor(f"hf:{tmp_path / 'vit'}")
    torch.testing.assert_close(head(x), vit_out.pooler_output, atol=1e-6, rtol=1e-5)
    token, _ = build_extractor(f"hf:{tmp_path / 'vit'}", pool="token")
    torch.testing.assert_close(token(x), vit_out.last_hidden_state[:, 0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(PROCESSORS))
def test_preprocessing_equals_image_processor(kind, tmp_path):
    """The image processor's resize (shortest edge + centre crop, or height x width), rescale
    and normalisation at 224 px on real photos, equal within resize rounding: Transformers
    rounds the long side up where torchvision truncates it (640x427 -> 336 vs 335), which
    moves the centre crop by one pixel; aligned by that pixel, the mean difference is below
    half an 8-bit level."""
    from transferlab.data.preprocess import build_transform, resolve_preprocess
    from transferlab.models.transformers_source import processor_data_config

    make, crop_pct, interpolation = PROCESSORS[kind]
    proc = make()
    proc.save_pretrained(tmp_path)
    spec = resolve_preprocess(processor_data_config(ModelConfig(name=f"hf:{tmp_path}"), None))
    assert spec.input_size == (3, 224, 224)
    assert spec.crop_pct == pytest.approx(crop_pct)
    assert spec.interpolation == interpolation
    assert spec.mean == pytest.approx(tuple(proc.image_mean))
    transform = build_transform(spec)
    std = torch.tensor(proc.image_std).view(3, 1, 1) * 255  # normalised -> 8-bit levels
    for photo in photos():
        a = transform(photo)
        b = proc(images=photo, return_tensors="pt")["pixel_values"][0]
        assert a.shape == b.shape
        inner = a[:, 1:-1, 1:-1]
        best = min(((inner - b[:, 1 + dy:223 + dy, 1 + dx:223 + dx]).abs() * std).mean().item()
                   for dx in (-1, 0, 1) for dy in (-1, 0, 1))
        assert best < 0.5


def test_text_equals_get_text_features(folders):
    from transferlab.models.texttower import build_text_tower, encode_texts

    texts = ["a photo of a cat", "a drawing of the large dog", "red car"]
    tower = build_text_tower(ModelConfig(name=f"hf:{folders['clip']}"),
                             {"source": "transformers"})
    got = encode_texts(tower, texts)
    model = transformers.CLIPModel.from_pretrained(folders["clip"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folders["clip"])
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = pooled(model.get_text_features(input_ids=batch["input_ids"],
                                              attention_mask=batch["attention_mask"]))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def crafted(folders, tmp_path, edit) -> Path:
    folder = tmp_path / "crafted"
    shutil.copytree(folders["dino"], folder)
    config = json.loads((folder / "config.json").read_text())
    edit(folder, config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_folder_naming_code_is_refused(folders, tmp_path):
    folder = crafted(folders, tmp_path, lambda f, c: c.update(
        auto_map={"AutoModel": "evil.EvilModel"}))
    (folder / "evil.py").write_text("raise SystemExit('ran code')\n")
    with pytest.raises(ModelError, match=r"names its own code \(auto_map\).*model.trust_code: "
                                         "true"):
        build_extractor(f"hf:{folder}")


def test_unknown_model_type_is_refused(folders, tmp_path):
    folder = crafted(folders, tmp_path, lambda f, c: c.update(model_type="evil-net"))
    with pytest.raises(ModelError, match="model_type evil-net, which Transformers .* does "
                                         "not know"):
        build_extractor(f"hf:{folder}")


def test_pickle_only_folder_is_refused(folders, tmp_path):
    def to_bin(folder, config):
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    folder = crafted(folders, tmp_path, to_bin)
    with pytest.raises(ModelError, match=r"holds only pytorch_model.bin \(pickles, never loaded\)"):
        build_extractor(f"hf:{folder}")


def test_claimed_sizes_are_bounded(folders, tmp_path):
    folder = crafted(folders, tmp_path, lambda f, c: c.update(image_size=10**7))
    with pytest.raises(ModelError, match="image_size"):
        build_extractor(f"hf:{folder}")


def test_recorded_folder_needs_trust(folders):
    """A store naming a Hub id is rebuilt; one naming a folder (a path outside the store)
    only with trust_code; a missing folder is one line."""
    assert checked_model(ModelConfig(name="hf:facebook/dinov2-small"), "the store",
                         False).source == "transformers"
    name = f"hf:{folders['dino']}"
    with pytest.raises(ModelError, match="asks to build its model with"):
        checked_model(ModelConfig(name=name), "the store", False)
    assert checked_model(ModelConfig(name=name), "the store", True).source == "transformers"
    with pytest.raises(ModelError, match="no folder /nonexistent/x and not a Hub id"):
        build_extractor("hf:/nonexistent/x")


def test_offline_hub_id_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="could not fetch 'hf:nobody/no-such-model'"):
        build_extractor("hf:nobody/no-such-model")


def test_missing_library_is_one_line(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelError, match=r'pip install "transferlab\[transformers\]"'):
        build_extractor(f"hf:{folders['dino']}")
