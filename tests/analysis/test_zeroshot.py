"""Text on CLIP-family stores: the store's rows and text vectors equal OpenCLIP's own
encode_image / encode_text, text search ranks the image a caption was chosen for first,
zero-shot predictions and accuracy equal a hand computation (random weights, offline)."""
from __future__ import annotations

import contextlib
import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import hf_clip_folder, make_cfg, make_store, tiny_open_clip
from tests.imagegen import make_image_tree
from transferlab.analysis.splits import split_by_key
from transferlab.analysis.zeroshot_labels import (
    DEFAULT_TEMPLATES,
    class_vectors,
    parse_classes,
    read_templates,
    run_zeroshot,
    zero_shot_scores,
)
from transferlab.commands import main as transferlab_main
from transferlab.errors import ModelError, SettingError
from transferlab.extract.runner import run_extract
from transferlab.runtime.device import seed_everything

open_clip = pytest.importorskip("open_clip")
CLASSES = ("bird", "cat", "dog")  # sorted, as the folder source names them
CAPTIONS = [f"a {a} {b} of the {c}" for a in ("red", "blue", "green", "small", "large")
            for b in ("photo", "drawing", "picture") for c in CLASSES]


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    """A labelled store of the tiny OpenCLIP model (head: its image embedding), float32,
    whole-image resize (OpenCLIP's own transform exactly)."""
    tmp = tmp_path_factory.mktemp("zeroshot")
    root = tmp / "data"
    keys = make_image_tree(root, classes=CLASSES, per_class=5, unicode_name=False)
    cfg = make_cfg(root, tmp / "store", f"model.name={tiny_open_clip()}",
                   "output.dtype=float32", "preprocess.window=image")
    store = run_extract(cfg).store
    return store, root, keys


def reference():
    """OpenCLIP's own model, tokenizer and eval transform, with the store's seed."""
    seed_everything(0)
    model = open_clip.create_model("tl-tiny-clip").eval()
    pp = model.visual.preprocess_cfg
    transform = open_clip.image_transform(model.visual.image_size, is_train=False,
                                          mean=pp["mean"], std=pp["std"])
    return model, open_clip.get_tokenizer("tl-tiny-clip"), transform


def reference_images(store, root):
    model, _, transform = reference()
    images = torch.stack([transform(Image.open(root / k).convert("RGB")) for k in store.keys])
    with torch.no_grad():
        return model.encode_image(images).numpy()


def reference_texts(texts):
    model, tokenizer, _ = reference()
    with torch.no_grad():
        return model.encode_text(tokenizer(list(texts))).numpy()


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_store_rows_and_text_tower_record(clip_store):
    store, root, keys = clip_store
    assert store.meta["text_tower"] == {"source": "open_clip", "name": tiny_open_clip(),
                                        "embedding": "encode_image", "normalized": False}
    np.testing.assert_allclose(np.asarray(store.features), reference_images(store, root),
                               atol=1e-5, rtol=1e-4)


def test_text_search_ranks_the_captioned_image_first(clip_store):
    """With random weights no caption describes an image, so the case is built: OpenCLIP's
    own model (not transferlab) scores every candidate caption against every image; the
    caption whose best image wins by the widest margin is that image's caption. The store
    search (rows from extraction, text from the text tower rebuilt from meta.json) must rank
    that image first, and give OpenCLIP's whole ranking."""
    store, root, keys = clip_store
    sims = unit(reference_texts(CAPTIONS)) @ unit(reference_images(store, root)).T
    top2 = np.sort(sims, axis=1)[:, -2:]
    chosen = int(np.argmax(top2[:, 1] - top2[:, 0]))
    assert top2[chosen, 1] - top2[chosen, 0] > 1e-3  # a clear winner, not a tie
    hits = store.nearest_text([CAPTIONS[chosen]], k=5)[0]
    assert hits[0][0] == store.keys[int(np.argmax(sims[chosen]))]
    want = np.argsort(-sims[chosen], kind="stable")[:5]
    assert [k for k, _ in hits] == [store.keys[i] for i in want]
    np.testing.assert_allclose([d for _, d in hits], 1 - sims[chosen][want], atol=1e-5)


def test_zero_shot_accuracy_equals_hand_computation(clip_store):
    store, root, keys = clip_store
    templates = ["a photo of a {}", "a drawing of the {}"]
    result = run_zeroshot(store, templates=templates)
    # by hand: every prompt through encode_text, per class the mean of unit vectors, unit
    text = unit(reference_texts([t.format(c) for c in CLASSES for t in templates]))
    classes = unit(text.reshape(3, 2, -1).mean(1))
    scores = unit(reference_images(store, root)) @ classes.T
    predicted = scores.argmax(1)
    truth = np.array([CLASSES.index(k.split("/")[0]) for k in store.keys])
    assert result.classes == list(CLASSES)  # the store's class names by default
    np.testing.assert_array_equal(result.predicted, predicted)
    np.testing.assert_allclose(result.scores, scores, atol=1e-5)
    assert result.accuracy == pytest.approx((predicted == truth).mean())
    assert result.n_scored == len(keys)
    # the probe's validation split (seed 0): zero-shot there, and the probe beside it
    labels = np.asarray(store.labels)
    _, va = split_by_key(labels, np.asarray(store.keys, dtype=object),
                         np.zeros(len(labels), dtype=np.int64), 0.2, 0)
    assert result.n_val == len(va) > 0
    assert result.val_accuracy == pytest.approx((predicted[va] == truth[va]).mean())
    assert 0.0 <= result.probe_accuracy <= 1.0


def test_user_classes_score_only_their_images(clip_store):
    """Classes given by name: rows whose true class is not listed are predicted, not
    scored."""
    store, root, _ = clip_store
    result = run_zeroshot(store, "dog, cat", templates=["{}"], probe=False)
    truth = [k.split("/")[0] for k in store.keys]
    scored = [i for i, t in enumerate(truth) if t in ("dog", "cat")]
    assert result.n_scored == len(scored) == 10
    hits = [result.classes[result.predicted[i]] == truth[i] for i in scored]
    assert result.accuracy == pytest.approx(np.mean(hits))
    assert result.val_accuracy is None


def test_class_vectors_and_scores_by_hand():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(6, 4)).astype(np.float32)  # 3 classes x 2 templates
    want = unit(unit(text).reshape(3, 2, 4).mean(1))
    np.testing.assert_allclose(class_vectors(text, 3, 2), want, atol=1e-6)
    images = rng.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(zero_shot_scores(images, want), unit(images) @ want.T, atol=1e-6)


def test_templates_and_classes_are_checked(tmp_path, clip_store):
    assert read_templates(None) == read_templates("DEFAULT") == list(DEFAULT_TEMPLATES)
    path = tmp_path / "t.txt"
    path.write_text("# mine\na photo of a {}.\n\nart of the {}\n")
    assert read_templates(str(path)) == ["a photo of a {}.", "art of the {}"]
    for bad in (["no slot"], ["{} and {}"], []):
        with pytest.raises(SettingError, match="templates needs"):
            read_templates(bad)
    with pytest.raises(SettingError, match="templates is neither DEFAULT nor a file"):
        read_templates(str(tmp_path / "missing.txt"))
    with pytest.raises(SettingError, match="classes needs at least two distinct"):
        parse_classes("cat,cat", clip_store[0])
    unlabelled = make_store(tmp_path / "s", np.ones((2, 4), np.float32), [0, 0],
                            class_names=[])
    with pytest.raises(SettingError, match="classes must be given"):
        parse_classes(None, unlabelled)


def test_store_without_text_tower_is_one_line(tmp_path):
    store = make_store(tmp_path / "plain", np.ones((3, 4), np.float32), [0, 1, 0])
    with pytest.raises(ModelError, match="has no text tower: text queries and zero-shot labels "
                                         "need a store of a CLIP-family model"):
        store.nearest_text(["a photo of a cat"])
    with pytest.raises(ModelError, match="has no text tower"):
        run_zeroshot(store, "cat,dog")


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = transferlab_main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_commands_zeroshot_and_search_text(clip_store, tmp_path):
    store, root, keys = clip_store
    out = tmp_path / "pred.csv"
    code, text, err = run("zeroshot", store.dir, "--templates", "DEFAULT", "--out", out)
    assert code == 0, err
    result = run_zeroshot(store)
    assert f"zero-shot accuracy (all {len(keys)} labelled images): {result.accuracy:.4f}" in text
    assert "linear probe" in text and f"wrote {out}" in text
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == list(store.keys)
    assert [r["predicted"] for r in rows] == [CLASSES[i] for i in result.predicted]
    assert [r["true"] for r in rows] == [k.split("/")[0] for k in store.keys]
    code, _, err = run("zeroshot", store.dir, "--out", out)
    assert code == 2 and "--overwrite" in err
    code, text, err = run("search", store.dir, "--text", "a red photo of the cat", "-k", "2")
    assert code == 0, err
    hits = store.nearest_text(["a red photo of the cat"], k=2)[0]
    assert text.startswith("query: text: a red photo of the cat")
    assert all(k in text for k, _ in hits)
    code, _, err = run("search", store.dir)
    assert code == 2 and "--text" in err


def test_transformers_store_text_needs_trust_for_its_folder(tmp_path):
    """A store of a model folder names a path outside itself: its text tower is rebuilt only
    with trust_code; then text vectors equal get_text_features."""
    transformers = pytest.importorskip("transformers")
    folder = hf_clip_folder(tmp_path / "clip")
    root = tmp_path / "data"
    make_image_tree(root, classes=("cat", "dog"), per_class=2, unicode_name=False)
    store = run_extract(make_cfg(root, tmp_path / "store", f"model.name=hf:{folder}",
                                 "output.dtype=float32")).store
    assert store.meta["text_tower"]["source"] == "transformers"
    with pytest.raises(ModelError, match="asks to build its model with 'hf:.*trust_code=True"):
        store.nearest_text(["a photo of a cat"])
    from transferlab.extract.queries import embed_texts

    got = embed_texts(store.meta, ["a photo of a cat", "dog"], root=store.dir, trust_code=True)
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    batch = transformers.AutoTokenizer.from_pretrained(folder)(
        ["a photo of a cat", "dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model.get_text_features(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"])
    np.testing.assert_allclose(got, getattr(want, "pooler_output", want).numpy(), atol=1e-5)
    assert len(store.nearest_text(["a photo of a cat"], k=2, trust_code=True)[0]) == 2
