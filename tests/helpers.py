"""Helpers shared by test modules (a test module never imports another one).

Assertions here are rewritten by pytest like a test's own (``conftest.py`` registers this
module), so a failing helper shows its values.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tests.imagegen import random_image, save
from transferlab.commands.extraction import main
from transferlab.config import ExtractConfig, FinetuneConfig, load_config
from transferlab.extract.runner import run_extract
from transferlab.store.reader import FeatureStore
from transferlab.store.writer import StoreWriter

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "transferlab" / "data" / "mnist_5k.npz"

# ---------------------------------------------------------------------------------------
# Extraction in-process: timm's test_resnet at 32x32, fp32, one thread
# ---------------------------------------------------------------------------------------

BASE = {"model": {"name": "test_resnet", "pretrained": False},
        "preprocess": {"input_size": [32, 32]},  # timm's center crop: short side 33, crop 32
        # fp32: the tests compare with reference computations ('auto' is bf16 on AMX CPUs)
        "runtime": {"batch_size": 4, "num_workers": 0, "threads": 1, "progress": False,
                    "precision": "fp32", "device": "cpu"},  # GPU tests ask for cuda
        "output": {"shard_size": 8}}


def write_config(path: Path, extra: dict | None = None) -> Path:
    data = json.loads(json.dumps(BASE))
    for section, values in (extra or {}).items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def make_cfg(root: Path, out: Path, *overrides: str) -> ExtractConfig:
    items = [f"{k}.{s}={json.dumps(v)}" for k, sec in BASE.items() for s, v in sec.items()]
    return load_config(None, [*items, f"data.root={root}", f"output.dir={out}", *overrides],
                       ExtractConfig)


def cli(*argv: str) -> tuple[int, str, str]:
    """Run the real entry point in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def summary_counts(text: str) -> tuple[int, int, int]:
    words = text.split()
    return (int(words[words.index("written,") - 2]), int(words[words.index("failed,") - 1]),
            int(words[words.index("skipped") - 1]))


def same_store(a: FeatureStore, b: FeatureStore) -> None:
    """Value for value: rows, keys, labels, views, failures and shard layout."""
    assert a.keys == b.keys
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.views, b.views)
    assert a.failures == b.failures
    assert [s["rows"] for s in a.meta["shards"]] == [s["rows"] for s in b.meta["shards"]]
    assert np.array_equal(np.asarray(a.features), np.asarray(b.features))


# ---------------------------------------------------------------------------------------
# The extract command as a process: kills, resumes, torchrun (48x48, float16 rows)
# ---------------------------------------------------------------------------------------

CONFIG = {"model": {"name": "test_resnet", "pretrained": False},
          "preprocess": {"input_size": [48, 48]},
          "runtime": {"batch_size": 8, "num_workers": 0, "threads": 1, "progress": False,
                      "device": "cpu"},
          "output": {"shard_size": 16}}
# Float16 rows (relative step 2**-11) of float32 features whose last bits depend on the batch
# a row was computed in (CPU kernels block and sum differently for other batch shapes, and a
# different last bit can flip a float16 rounding): such rows agree to about one float16 step
# of the largest feature. Resumed runs recompute whole batches and agree exactly.
ATOL = 1e-3


def make_tree(root: Path, count: int, size: int = 0) -> list[str]:
    """``count`` small images in three class folders (JPEG and PNG, various sizes)."""
    keys = []
    for i in range(count):
        ext = ".jpg" if i % 2 else ".png"
        w, h = (size, size) if size else (24 + i % 17, 20 + i % 13)
        key = f"{'abc'[i % 3]}/{i:04d}{ext}"
        save(random_image(w, h, seed=i), root / key)
        keys.append(key)
    return keys


def cli_command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "transferlab.extract", str(config), *overrides]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}


def finished_shards(out: Path) -> int:
    return len(list((out / "shards").glob("shard-*.json"))) if (out / "shards").is_dir() else 0


def kill_when(folder: dict, out: Path, ready, extra_delay: float = 0.0) -> int:
    """Start the CLI, SIGKILL it once ``ready(elapsed_seconds)`` holds; finished shards then."""
    proc = subprocess.Popen(cli_command(folder["config"], *folder["overrides"],
                                        f"output.dir={out}"),
                            cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    started = time.monotonic()
    try:
        while not ready(time.monotonic() - started):
            assert proc.poll() is None, "the run ended before the kill; make it slower"
            assert time.monotonic() - started < 240, "the run made no progress"
            time.sleep(0.005)
        time.sleep(extra_delay)
        shards = finished_shards(out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "meta.json").exists(), "the run finished before the kill"
    return shards


def complete(folder: dict, out: Path) -> tuple[int, int, int]:
    done = subprocess.run(cli_command(folder["config"], *folder["overrides"],
                                      f"output.dir={out}"),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    return summary_counts(done.stdout)


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """The command line of a real ``torchrun`` launch (run it with ``env()`` in ``REPO``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *args]


def assert_same_rows(got: FeatureStore, want: FeatureStore) -> None:
    """Keys, labels and failures equal; rows within ``ATOL`` (other batch compositions)."""
    assert got.keys == want.keys
    assert np.array_equal(got.labels, want.labels)
    assert np.allclose(np.asarray(got.features, np.float32), np.asarray(want.features, np.float32),
                       atol=ATOL * float(np.abs(np.asarray(want.features)).max()))
    assert sorted(got.failures) == sorted(want.failures)


# ---------------------------------------------------------------------------------------
# WebDataset shards
# ---------------------------------------------------------------------------------------


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(src: Path, keys: list[str], out: Path, per_shard: int,
                name: str = "train") -> dict[str, str]:
    """WebDataset shards of the images ``src/key`` in key order: per image the member
    ``key`` plus its class name (.txt), class index (.cls) and a .json; returns
    {tar key: folder key}."""
    out.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for s in range(0, len(keys), per_shard):
        shard = f"{name}-{s // per_shard:06d}"
        with tarfile.open(out / f"{shard}.tar", "w") as tar:
            for key in keys[s:s + per_shard]:
                stem, cls = key.rsplit(".", 1)[0], key.split("/")[0]
                add_member(tar, key, (src / key).read_bytes())
                add_member(tar, f"{stem}.txt", cls.encode())
                add_member(tar, f"{stem}.cls", str("abc".index(cls)).encode())
                add_member(tar, f"{stem}.json", json.dumps({"label": cls}).encode())
                mapping[f"{shard}/{stem}"] = key
    return mapping


def extract(tmp: Path, name: str, data: dict, *overrides: str) -> FeatureStore:
    """``CONFIG`` over the data section ``data``, in-process, into ``tmp / name``."""
    raw = {**CONFIG, "data": data, "output": {**CONFIG["output"], "dir": str(tmp / name)}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, list(overrides), ExtractConfig)
    return run_extract(cfg).store


# ---------------------------------------------------------------------------------------
# Stores of given rows (probe, cluster)
# ---------------------------------------------------------------------------------------


def blobs(n_per=100, k=5, d=8, sep=20.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=sep, size=(k, d))
    x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centers])
    y = np.repeat(np.arange(k), n_per)
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


def make_store(path, x, labels, keys=None, views=None, class_names=None) -> FeatureStore:
    """A finished float16 store of the rows ``x``, as extraction writes it; keys default to
    CSV-hostile names (comma, space, non-ASCII), class names to ``class 0`` ...."""
    if keys is None:
        keys = [f"dir,{lab}/img ü {i}.png" for i, lab in enumerate(labels)]
    if class_names is None:
        class_names = [f"class {c}" for c in range(int(max(labels)) + 1)]
    writer = StoreWriter(path, fingerprint={"test": "rows"}, dtype="float16", shard_size=16)
    writer.add(keys, labels, x, views=views)
    return writer.close({"class_names": class_names})


# ---------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------


def tiny(tmp_path, *overrides, name="run"):
    """LeNet on the 1,200 bundled training digits 5-7 (300 test digits), two quick epochs."""
    return load_config(None, [
        "model.name=lenet", "model.cut=first:7", "data.source=mnist-5k",
        "data.classes=[5, 6, 7]", "test.split=test",
        "head.type=mlp", "head.hidden=[64]", "train.epochs=2", "train.batch_size=32",
        "runtime.progress=false", f"output.dir={tmp_path / name}", *overrides], FinetuneConfig)


def write_digit_folder(root, per_class=12, classes=(3, 7), split="train"):
    """Real MNIST digits as PNG files in class sub-folders (learnable, tiny)."""
    with np.load(MNIST) as data:
        images, labels = data["images"], data["labels"]
    for c in classes:
        rows = np.flatnonzero(labels == c)
        rows = rows[:per_class] if split == "train" else rows[-per_class:]
        for i, r in enumerate(rows):
            path = Path(root) / f"digit{c}" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[r]).save(path)
    return Path(root)


# ---------------------------------------------------------------------------------------
# CLIP-family models with random weights, offline (OpenCLIP config, Transformers folders)
# ---------------------------------------------------------------------------------------

TINY_OPEN_CLIP = "tl-tiny-clip"  # registered by ``tiny_open_clip``: a ViT-B-like at 32 px
TINY_CLIP_WORDS = ["a", "photo", "of", "the", "cat", "dog", "bird", "car", "red", "blue",
                   "green", "small", "large", "picture", "drawing", "an", "image", "itap",
                   "bad", "origami", "in", "video", "game", "art", "digit3", "digit7"]


def tiny_open_clip() -> str:
    """Register a tiny OpenCLIP model config (random weights; SimpleTokenizer, which ships
    with open_clip) once per process; return its ``model.name``."""
    import open_clip

    if TINY_OPEN_CLIP not in open_clip.list_models():
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="tl-open-clip-"))
        (path / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps({
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                           "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                         "layers": 2}}))
        open_clip.add_model_config(path / f"{TINY_OPEN_CLIP}.json")
    return f"open_clip:{TINY_OPEN_CLIP}"


def tiny_tokenizer():
    """A word-level fast tokenizer over ``TINY_CLIP_WORDS`` (bos / eos around each text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *TINY_CLIP_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def hf_clip_folder(path: Path, seed: int = 0) -> Path:
    """A tiny CLIP saved with save_pretrained (safetensors, processor, tokenizer)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(vision_config=dict(**tower, image_size=32, patch_size=8),
                        text_config=dict(**tower, vocab_size=len(TINY_CLIP_WORDS) + 4,
                                         max_position_embeddings=16, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=0),
                        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def hf_dinov2_folder(path: Path, seed: int = 0) -> Path:
    """A tiny DINOv2 (image only) saved with save_pretrained, processor 36 -> crop 32."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=2, image_size=32,
                             patch_size=8)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path


def photos() -> list[Image.Image]:
    """Real photographs (scikit-learn's bundled sample images, 640x427)."""
    from sklearn.datasets import load_sample_image

    return [Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg")]
