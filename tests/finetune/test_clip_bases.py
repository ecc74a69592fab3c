"""Fine-tuning on OpenCLIP and Transformers bases (frozen, head-only, the feature cache) and
predicting from the checkpoint, rebuilt without pickles and without the model folder."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import hf_dinov2_folder, tiny_open_clip, write_digit_folder
from transferlab.config import FinetuneConfig, load_config
from transferlab.finetune.run import run_finetune
from transferlab.models.checkpoint import read_checkpoint
from transferlab.models.classifier import load_model


def finetune(tmp_path, name, *extra):
    root = write_digit_folder(tmp_path / "digits", per_class=6)
    cfg = load_config(None, [f"model.name={name}", "model.cut=head", "data.source=folder",
                             f"data.root={root}", "train.epochs=2", "train.batch_size=4",
                             "train.lr=0.05", "train.cache=memory", "runtime.precision=fp32",
                             "runtime.progress=false", f"output.dir={tmp_path / 'out'}",
                             *extra], FinetuneConfig)
    return run_finetune(cfg), root


def check_round_trip(result, root, tmp_path, frozen_reference):
    """The checkpoint holds the untouched base and the trained head; load_model rebuilds it
    (safetensors + JSON only) and predicts what the trained run's model predicts."""
    assert result.stage("head-only").details["cache"] == "cpu"
    state, meta = read_checkpoint(result.checkpoint)
    for key, value in frozen_reference.items():
        torch.testing.assert_close(state[f"base.{key}"], value, rtol=0, atol=0)
    files = sorted(root.rglob("*.png"))[:4]
    model = load_model(result.checkpoint)
    probs = model.predict_proba(files)
    again = load_model(result.checkpoint).predict_proba(files)
    assert torch.equal(probs, again)
    assert model.class_names == ["digit3", "digit7"]
    preds = model.predict([Image.open(f) for f in files])
    assert [p[0] for p in preds] == [model.class_names[i] for i in probs.argmax(1)]
    return meta


def test_open_clip_base_finetune_and_predict(tmp_path):
    import open_clip

    from transferlab.runtime.device import seed_everything

    name = tiny_open_clip()
    result, root = finetune(tmp_path, name)
    seed_everything(0)
    visual = open_clip.create_model("tl-tiny-clip").visual
    frozen = {f"body.model.visual.{k}": v for k, v in visual.state_dict().items()}
    meta = check_round_trip(result, root, tmp_path, frozen)
    assert meta["arch"]["name"] == name and meta["arch"]["source"] == "open_clip"
    assert meta["arch"]["pretrained"] is False


def test_transformers_base_finetune_and_predict_without_the_folder(tmp_path):
    """The checkpoint records the model's config (not its folder): predict works after the
    folder is gone, and a crafted config in the checkpoint is refused like a folder's."""
    import transformers

    folder = hf_dinov2_folder(tmp_path / "dino")
    result, root = finetune(tmp_path, f"hf:{folder}")
    dino = transformers.Dinov2Model.from_pretrained(folder)
    frozen = {f"body.model.vision.{k}": v for k, v in dino.state_dict().items()}
    before = load_model(result.checkpoint).predict_proba(sorted(root.rglob("*.png"))[:4])
    shutil.rmtree(folder)
    meta = check_round_trip(result, root, tmp_path, frozen)
    after = load_model(result.checkpoint).predict_proba(sorted(root.rglob("*.png"))[:4])
    assert torch.equal(before, after)
    assert meta["arch"]["source"] == "transformers"
    assert meta["arch"]["kwargs"]["hf_config"]["model_type"] == "dinov2"

    from transferlab.errors import ModelError
    from transferlab.models.checkpoint import save_checkpoint

    crafted = tmp_path / "crafted.safetensors"
    meta["arch"]["kwargs"]["hf_config"]["auto_map"] = {"AutoModel": "evil.Model"}
    save_checkpoint(crafted, read_checkpoint(result.checkpoint)[0], meta)
    with pytest.raises(ModelError, match=r"names its own code \(auto_map\)"):
        load_model(crafted)
    assert np.isfinite(after.numpy()).all()
