"""Typed configs loaded from YAML with ``key.sub=value`` overrides.

Every setting lives in one dataclass field with its default and a comment; every range a
value must lie in lives in ``BOUNDS``. Loading is strict: an unknown key, a wrong type, a bad
choice, a value out of range or a missing file raises ``ConfigError`` naming the key, the
file and the closest valid key (or the valid range).

A config is saved beside every output and shared: cloud credentials and endpoints never
belong in it; they come from the environment only (``data.remote``).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import ConfigError
from .runtime.atomicfile import atomic_write_text
from .yamlsafe import (
    FLOAT_TEXT,
    YamlSyntaxError,
    check_colon_keys,
    load_yaml_text,
    read_yaml_file,
    shown,
    shown_text,
)

T = TypeVar("T")

IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm"]


@dataclass
class ModelConfig:
    """Which backbone, with which weights, cut where."""

    # timm name, torchvision name, built-in name (lenet), transferlab checkpoint path,
    # Hugging Face Hub repository through timm (hf-hub:ORG/NAME) or a timm model folder
    # (config.json + model.safetensors, read with its weights), or 'package.module:callable'
    # returning an nn.Module; open_clip:ARCH[/PRETRAINED] (OpenCLIP's image tower) or
    # hf:ORG/NAME / hf:/path/to/folder (Hugging Face Transformers AutoModel).
    name: str = "resnet50"
    # Where `name` comes from; 'auto' tries built-in, checkpoint, hub, callable, timm,
    # torchvision.
    source: Literal["auto", "timm", "torchvision", "builtin", "checkpoint", "callable",
                    "hub", "open_clip", "transformers"] = "auto"
    pretrained: bool = False  # download (or use the cached) hub weights of the library
    weights: str | None = None  # local .safetensors / .pth / .pt / .bin file
    # head | first:N | drop:N | layer:NAME | stage:I (see transferlab.models.cuts), or a list
    # of them / all-stages / all-blocks: several cuts in one pass, a store each in
    # output.dir/<cut>/.
    cut: str | list[str] = "head"
    # Pooling of the cut output: avg | max | avgmax | token | tokenavg (class token and mean
    # of patch tokens concatenated) | none; null = avg for 'head'
    # (or the model's own pooling), none for the other cuts. With several cuts: one pooling
    # for all, a list (one per cut) or a mapping {cut: pool}.
    # grid2 | grid4: the averages of a 2x2 | 4x4 grid of cells, concatenated (C*4 | C*16)
    pool: (Literal["avg", "max", "avgmax", "token", "tokenavg", "none", "grid2", "grid4"]
           | list | dict | None) = None
    num_classes: int | None = None  # classes of the model as built (built-ins, untrained models)
    in_chans: int | None = None  # input channels as built; null = the model's default
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments for the model factory
    # Also Hugging Face's trust_remote_code for hf: models (a config naming its own code).
    # A checkpoint named by `name` records its architecture; it is rebuilt only from timm,
    # torchvision or the built-ins unless this is true (then a 'module:callable' it names runs:
    # set it only for checkpoints you trust, like Hugging Face's trust_remote_code).
    trust_code: bool = False


@dataclass
class PreprocessConfig:
    """Overrides of the preprocessing resolved from the backbone's pretrained config."""

    # center_crop: resize the short side then crop, as the model was evaluated;
    # squash: resize straight to the input size (aspect ratio not kept).
    resize: Literal["center_crop", "squash"] = "center_crop"
    # crop: center_crop resamples only the crop window (less work; a few pixel values differ
    # by 1-3 levels, BENCHMARKS.md section 11); image: resample the whole image, then crop
    # (timm's transform exactly).
    window: Literal["crop", "image"] = "crop"
    input_size: list[int] | None = None  # [H, W] or [C, H, W]; null = the model's
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos"] | None = None
    mean: list[float] | None = None  # per channel, in [0, 1] pixel units
    std: list[float] | None = None
    crop_pct: float | None = None  # fraction of the resized image kept by the centre crop
    channels: int | None = None  # 1 or 3; null = the model's input channels


@dataclass
class DataConfig:
    """Where images come from."""

    # folder: image folder (class sub-folders become labels); list: text/CSV file of paths;
    # torchvision: a torchvision dataset by name; mnist-5k: the 5,000 bundled MNIST digits;
    # webdataset: WebDataset tar shards named by `urls` (read in place, never unpacked).
    source: Literal["folder", "list", "torchvision", "mnist-5k", "webdataset"] = "folder"
    # data root; keys in stores are paths relative to it. root, list_file and urls may be
    # local paths or s3:// gs:// http(s):// file:// URLs (credentials and endpoint come from
    # the environment only: AWS_ENDPOINT_URL, AWS_PROFILE, ...; never from this file, which
    # is saved beside every output).
    root: str | None = None
    list_file: str | None = None  # for source=list: one path per line, or a CSV with a header
    # for source=webdataset: shard paths/URLs, a list or one string with brace expansion
    # ("shards/train-{000000..000123}.tar"); keys are <shard name>/<member key>, in tar order
    urls: str | list[str] | None = None
    # webdataset member holding each item's label: cls (an integer), txt (a class name) or
    # json (its "label" value, integer or class name); null = no labels (-1)
    label_key: Literal["cls", "txt", "json"] | None = None
    path_column: str = "path"  # CSV column holding paths
    label_column: str | None = None  # CSV column holding labels (optional)
    dataset: str | None = None  # torchvision dataset: MNIST, FashionMNIST, CIFAR10, CIFAR100
    split: Literal["train", "test"] = "train"
    download: bool = False  # let torchvision download the dataset if it is not on disk
    classes: list | None = None  # keep only these labels (class names or integer labels)
    limit: int | None = None  # keep only the first N items (after sorting and filtering)
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    max_image_pixels: int = 89_478_485  # larger images are refused as decompression bombs


@dataclass
class RuntimeConfig:
    """Hardware use. 'auto' values are chosen from the device at run time."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 on CUDA, AMX CPUs; int8: ONNX Runtime static quantisation (README)
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    batch_size: int | None = None  # null = chosen for the device, backend and model size
    num_workers: int | None = None  # data loading processes; null = chosen for the machine
    channels_last: bool | None = None  # null = on for conv nets
    compile: bool = False  # torch.compile the extractor
    # the frozen forward's runtime (README, runtime.backend); recorded in the store's
    # fingerprint; auto: the measured fastest for this CPU kind and model family, else eager
    backend: Literal["auto", "eager", "compile", "onnxruntime", "openvino"] = "eager"
    calibration_images: int = 32  # precision int8: calibrated on the run's first N images
    fold_bn: bool = True  # fold frozen BatchNorm into the conv before it (same features)
    # torch intra-op threads on CPU; null = the cores others leave free, followed as that
    # load changes during an extraction (README, Speed settings)
    threads: int | None = None
    tune_malloc: bool = True  # CPU, glibc: reuse freed activation memory (BENCHMARKS.md)
    gpu_decode: bool = False  # decode JPEGs on the GPU in batches (CPU fallback)
    seed: int = 0
    progress: bool = True  # show progress bars


@dataclass
class OutputConfig:
    """Where and how extracted features are written."""

    dir: str = "outputs/features"
    dtype: Literal["float16", "float32"] = "float16"
    shard_size: int = 4096  # rows per .npy shard
    overwrite: bool = False  # replace a store written with another configuration
    views: int = 0  # augmented views per image in addition to the plain one
    view_mode: Literal["rows", "mean"] = "rows"  # store views as extra rows, or average them
    # average each image's features with its mirror image's (two forward passes): rows a
    # horizontal flip does not change, for near-duplicate search (configs/dedup.yaml)
    hflip: bool = False
    reduce: str | None = None  # srp:D | pca:D: project each row to D dims (extract/reduce.py)


@dataclass
class ExtractConfig:
    """Config of ``python -m transferlab.extract``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


@dataclass
class HeadConfig:
    """The classifier trained on top of the frozen base."""

    # linear: one Linear layer; mlp: hidden Linear layers then the output Linear;
    # keep: the model's own layers after the cut (Sequential: model[N:]; timm/torchvision:
    # its classifier) with the final Linear re-initialised to the new class count.
    type: Literal["linear", "mlp", "keep"] = "linear"
    hidden: list[int] = field(default_factory=list)  # mlp hidden sizes, e.g. [500]
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    dropout: float = 0.0  # before every Linear of linear/mlp heads
    in_features: int | None = None  # expected base feature size; null = taken from the cut


@dataclass
class TrainConfig:
    """One training phase: optimiser, schedule, epochs, batches, validation."""

    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: Literal["none", "cosine", "step"] = "none"  # per-step cosine, per-epoch step
    step_epochs: int = 1  # step schedule: multiply the lr by step_gamma every N epochs
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    val_split: float = 0.0  # fraction of the training items held out (stratified, seeded)
    early_stopping: int = 0  # patience in epochs on validation loss (0 = off; needs val_split)
    augment: bool = False  # timm's random training transform (disables the feature cache)
    # auto: cache base features in memory when they fit, else on disk; memory | disk | off
    # (YAML reads a bare off as false, which means off too; true means auto)
    cache: Literal["auto", "memory", "disk", "off"] | bool = "auto"
    cache_max_gb: float | None = None  # memory budget of the cache; null = chosen from free memory


@dataclass
class PretrainConfig:
    """Optional first stage: train the whole backbone (all layers) on a source task, then use
    its checkpoint as the base of the fine-tune (the MNIST 0-4 -> 5-9 experiment)."""

    enabled: bool = False
    classes: list | None = None  # source-task labels (filter applied to the same data source)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class UnfreezeConfig:
    """Optional second phase: unfreeze the last layers of the base once the head converged."""

    layers: int = 0  # last N parameterised top-level layers of the base (0 = no second phase)
    epochs: int = 0
    lr_mult: float = 0.1  # base learning rate = train.lr * lr_mult (the head keeps train.lr)
    train_bn: bool = False  # let unfrozen BatchNorm layers update their running statistics


@dataclass
class ProbeStageConfig:
    """Optional 'explicit approach': logistic regression on frozen base features."""

    samples: int = 0  # training items drawn (seeded, stratified) for the probe; 0 = no probe
    l2: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    val_fraction: float = 0.2  # of the samples, to choose among several l2 strengths
    max_iter: int = 500


@dataclass
class FinetuneOutputConfig:
    """Where checkpoints, metrics and the resolved config are written."""

    dir: str = "outputs/finetune"
    save_every_epoch: bool = True  # rewrite the checkpoint (atomically) after every epoch,
    save_interval_s: float = 60.0  # but at most this often (0 = every epoch); always at the end


@dataclass
class FinetuneConfig:
    """Config of ``python -m transferlab.finetune``."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(cut="head"))
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)  # target task; data.classes filters it
    # held-out evaluation data: overrides of `data` (e.g. {split: test} or {root: val/});
    # null = none (the validation split, if any, is reported instead)
    test: dict | None = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    unfreeze: UnfreezeConfig = field(default_factory=UnfreezeConfig)
    probe: ProbeStageConfig = field(default_factory=ProbeStageConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: FinetuneOutputConfig = field(default_factory=FinetuneOutputConfig)
    # config overrides (a nested mapping) applied when the data cannot be loaded, e.g.
    # {data: {source: mnist-5k}, train: {epochs: 5}}: full MNIST when there, else the bundle
    fallback: dict | None = None


@dataclass
class SweepProbeConfig:
    """The probe of every (backbone, cut) store of a sweep: the linear L2 sweep and kNN on
    a held-out split fixed by ``runtime.seed`` (the same images for every store)."""

    val_fraction: float = 0.2  # held-out share of each class
    l2: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    knn: int = 5  # k of the cosine kNN probe; 0 skips it
    max_iter: int = 500  # L-BFGS iterations at most


@dataclass
class SweepConfig:
    """Config of ``transferlab sweep``: which backbone and which layer transfer best to this
    data? One multi-cut extraction per backbone into ``output.dir/<backbone>/<cut>/``
    (resumable), then the probe of every cut, into a leaderboard."""

    backbones: list[str] = field(default_factory=list)  # model names, as model.name takes them
    # all-stages | all-blocks | a list of cuts (the same for every backbone)
    cuts: str | list[str] = "all-stages"
    # pooling of every cut (avg: a C-wide vector per cut; none keeps C x H x W, often huge)
    pool: Literal["avg", "max", "avgmax", "token", "tokenavg", "none"] | None = "avg"
    pretrained: bool = False  # the library's pretrained weights of every backbone
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # dir: the sweep's root (stores, probe results, leaderboard); dtype, shard_size, views as
    # for extract
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="outputs/sweep"))
    probe: SweepProbeConfig = field(default_factory=SweepProbeConfig)


# Free-form mappings that overrides can reach into, with the schema their keys follow (so
# that `test.root=0777` is a string as `data.root=0777` is).
SUB_SCHEMAS: dict[tuple[type, str], type] = {(FinetuneConfig, "test"): DataConfig,
                                             (FinetuneConfig, "fallback"): FinetuneConfig}

MAX_VIEWS = 256  # augmented views per image: each costs a full forward pass
# Sizes that decide what a model allocates; a config, a store's meta.json, a checkpoint or a
# model folder's config.json may claim any number (issue #24), so each is bounded:
MAX_CLASSES = 100_000  # classifier outputs (ImageNet-22k has 21,843)
MAX_IN_CHANS = 1024  # input channels of the first layer
MAX_INPUT_SIDE = 4096  # pixels per side of the model's input (input_size H and W)
# characters of a key (a listed path, a tar member name, a store's index entry): PATH_MAX on
# Linux, so no file a key names has a longer path; data sources refuse longer ones where they
# read them and a store never takes one (the item is listed as a failure)
MAX_KEY_CHARS = 4096


@dataclass(frozen=True)
class Bound:
    """The valid values of one config field: ``ok(value)`` is true for them and ``valid`` says
    what they are in the error; ``hint`` ends the error; ``applies(section)`` limits the check
    to sections that use the field (always when None)."""

    ok: Callable[[Any], bool]
    valid: str
    hint: str = ""
    applies: Callable[[Any], bool] | None = None


def _at_least(n: int, valid: str) -> Bound:
    return Bound(lambda v: v is None or v >= n, valid)


_NON_EMPTY = Bound(lambda v: v is None or len(v) > 0, "a non-empty list (or null: every class)")


def _input_size_ok(v: Any) -> bool:
    return v is None or (isinstance(v, (list, tuple)) and len(v) in (2, 3)
                         and all(isinstance(n, int) and not isinstance(n, bool) for n in v)
                         and all(1 <= n <= MAX_INPUT_SIDE for n in v[-2:])
                         and (len(v) == 2 or 1 <= v[0] <= MAX_IN_CHANS))
_FRACTION = "in [0, 1)"

# Every range a config value must lie in, per schema and field: checked when a config loads
# (``from_dict``), by ``check_bounds`` on a config built in Python, and by ``check_range`` on a
# value that reaches the library another way (a function argument, a model's own setting).
BOUNDS: dict[type, dict[str, Bound]] = {
    ModelConfig: {
        "num_classes": Bound(lambda v: v is None or 0 <= v <= MAX_CLASSES,
                             f"between 0 and {MAX_CLASSES:,} (or null: the model's)"),
        "in_chans": Bound(lambda v: v is None or 1 <= v <= MAX_IN_CHANS,
                          f"between 1 and {MAX_IN_CHANS} (or null: the model's)"),
    },
    RuntimeConfig: {
        "batch_size": _at_least(1, "at least 1 (or null: chosen for the device)"),
        "num_workers": _at_least(0, "0 (main process) or more (or null: chosen)"),
        "threads": _at_least(1, "at least 1 (or null: chosen for the machine)"),
        "calibration_images": Bound(lambda v: 1 <= v <= 1024, "between 1 and 1024 (default 32)"),
    },
    DataConfig: {
        "max_image_pixels": _at_least(1, "at least 1 (default 89478485)"),
        "limit": _at_least(1, "at least 1 (or null: every item)"),
        "classes": _NON_EMPTY,
    },
    PretrainConfig: {"classes": _NON_EMPTY},
    PreprocessConfig: {
        "input_size": Bound(_input_size_ok, f"[H, W] or [C, H, W] with sides between 1 and "
                            f"{MAX_INPUT_SIDE} (or null: the model's)"),
        "crop_pct": Bound(lambda v: v is None or 0 < v <= 1, "in (0, 1], e.g. 0.875 (or null)"),
        "channels": Bound(lambda v: v in (None, 1, 3), "1 or 3 (or null: the model's)"),
        "std": Bound(lambda v: v is None or all(s > 0 for s in v),
                     "positive (or null: the model's)"),
    },
    OutputConfig: {
        "views": Bound(lambda v: 0 <= v <= MAX_VIEWS, f"between 0 and {MAX_VIEWS}"),
        "shard_size": _at_least(1, "at least 1"),
    },
    HeadConfig: {
        "dropout": Bound(lambda v: 0 <= v < 1, _FRACTION),
        "hidden": Bound(lambda v: all(h >= 1 for h in v), "sizes of at least 1, e.g. [500]",
                        applies=lambda head: head.type == "mlp"),
    },
    TrainConfig: {
        "epochs": _at_least(0, "0 or more"),
        "batch_size": _at_least(1, "at least 1"),
        "lr": Bound(lambda v: v > 0, "greater than 0, e.g. 1e-3"),
        "weight_decay": _at_least(0, "0 or more"),
        "label_smoothing": Bound(lambda v: 0 <= v < 1, _FRACTION),
        "val_split": Bound(lambda v: 0 <= v < 1, f"{_FRACTION} (0: no validation split)"),
        "early_stopping": _at_least(0, "0 (off) or more"),
        "step_epochs": _at_least(1, "at least 1"),
    },
    UnfreezeConfig: {
        "layers": _at_least(0, "0 (no second phase) or more"),
        "epochs": _at_least(0, "0 or more"),
        "lr_mult": Bound(lambda v: v > 0, "greater than 0, e.g. 0.1"),
    },
    ProbeStageConfig: {
        "samples": _at_least(0, "0 (no probe) or more"),
        # only used to choose among several l2 strengths
        "val_fraction": Bound(lambda v: 0 < v < 1, "between 0 and 1 (exclusive)", "try 0.2",
                              lambda probe: probe.samples > 0 and len(probe.l2) > 1),
    },
    FinetuneOutputConfig: {"save_interval_s": _at_least(0, "0 (every epoch) or more")},
    SweepConfig: {
        "backbones": Bound(lambda v: len(v) > 0 and all(str(b).strip() for b in v),
                           "a non-empty list of model names", "e.g. backbones: [resnet18, "
                           "vit_small_patch16_224]"),
        "cuts": Bound(lambda v: isinstance(v, str) or len(v) > 0,
                      "all-stages, all-blocks or a non-empty list of cuts"),
    },
    SweepProbeConfig: {
        "val_fraction": Bound(lambda v: 0 < v < 1, "between 0 and 1 (exclusive)", "try 0.2"),
        "l2": Bound(lambda v: len(v) > 0 and all(x > 0 for x in v),
                    "a non-empty list of positive strengths, e.g. [1e-4, 1e-2]"),
        "knn": _at_least(0, "0 (skip kNN) or more"),
        "max_iter": _at_least(1, "at least 1"),
    },
}


def check_range(schema: type, key: str, value: Any, source: str | None = None) -> None:
    """Raise the one-line ``ConfigError`` when ``value`` of dotted ``key`` (a field of
    ``schema``) is outside its ``BOUNDS``: '<key> must be <valid>, got <value>'."""
    bound = BOUNDS[schema][key.rpartition(".")[2]]
    if not bound.ok(value):
        where = f" in {source}" if source else ""
        hint = f"; {bound.hint}" if bound.hint else ""
        raise ConfigError(f"{key} must be {bound.valid}, got {shown(value)}{where}{hint}")


def _check_section(cfg: Any, prefix: str = "", source: str | None = None) -> None:
    """Check the bounded fields of one config dataclass (its sections are not entered)."""
    for name, bound in BOUNDS.get(type(cfg), {}).items():
        if bound.applies is None or bound.applies(cfg):
            check_range(type(cfg), prefix + name, getattr(cfg, name), source)


def check_bounds(cfg: Any, prefix: str = "") -> None:
    """Check a config built in Python (``load_config`` checked a loaded one), every section."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_bounds(value, f"{prefix}{f.name}.")
    _check_section(cfg, prefix)


# ---------------------------------------------------------------------------------------
# Loading machinery
# ---------------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                schema: type[T] = ExtractConfig) -> T:  # type: ignore[assignment]
    """Read a YAML file (or nothing) into ``schema``, then apply ``key.sub=value`` overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        resolved = resolve_config(path)
        source = str(resolved)
        data = read_yaml(resolved)
    for item in overrides or []:
        key, value = parse_override(item, schema)
        set_dotted(data, key, value)
    return from_dict(schema, data, source)


def builtin_config_dir() -> Path:
    """The example configs: ``transferlab/configs/`` in an installed package (the build copies
    the repository's ``configs/`` there, the one source), else ``configs/`` of this checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    if installed.is_dir():
        return installed
    return here.parent / "configs"  # a source checkout (editable install or PYTHONPATH)


def builtin_configs() -> dict[str, Path]:
    """Built-in config name (the file's stem) -> its file, sorted by name."""
    folder = builtin_config_dir()
    files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    return {f.stem: f for f in files}


def resolve_config(path: str | Path) -> Path:
    """The config file ``path`` names: a real file always wins; else a built-in name
    (``xception`` or ``xception.yaml``); else one line listing the built-in names."""
    candidate = Path(path)
    if os.path.lexists(candidate):
        return candidate  # a directory, dangling link ... gets read_yaml's own message
    text = str(path)
    builtins = builtin_configs()
    name = text[:-5] if text.endswith(".yaml") else text
    if name in builtins and not any(sep in text for sep in ("/", "\\")):
        return builtins[name]
    names = ", ".join(builtins) or "none found"
    close = difflib.get_close_matches(name.rsplit("/", 1)[-1], list(builtins), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"config file not found: {shown_text(text)}; {hint}built-in configs: "
                      f"{names} (transferlab config list; transferlab config show NAME > "
                      "my.yaml copies one)")


def read_yaml(path: Path) -> dict:
    data = read_yaml_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def parse_override(item: str, schema: type | None = None) -> tuple[str, Any]:
    """``model.cut=first:7`` -> ('model.cut', 'first:7').

    A string field of ``schema`` takes the text as typed (``output.dir=0777`` is '0777', not
    YAML's 511; quotes are removed; ``null`` unsets an optional one); other values are YAML.
    """
    if "=" not in item:
        raise ConfigError(f"override '{shown_text(item)}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{shown_text(item)}' has no key")
    if not raw.strip():
        return key, None
    hint = field_hint(schema, key) if schema is not None else None
    if hint is not None and takes_text(hint):
        if raw.strip() == "null" and type(None) in typing.get_args(hint):
            return key, None
        if raw[:1] in "'\"" and raw[-1:] == raw[:1] and len(raw) > 1:
            return key, load_yaml_text(raw, f"override '{shown_text(item)}'")
        return key, raw
    try:
        value = load_yaml_text(raw, f"override '{shown_text(item)}'")
    except YamlSyntaxError:
        if structured(hint):  # a list or mapping that does not parse is a mistake
            raise
        value = raw
    # keep strings such as 'first:7' as typed instead of YAML mappings
    if (isinstance(value, dict) and ":" in raw and not raw.strip().startswith("{")
            and not structured(hint)):
        value = raw
    return key, value


def field_hint(schema: type, key: str) -> Any:
    """The type of dotted ``key`` in ``schema`` (None when it is unknown or free-form)."""
    node: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return None
        hint = typing.get_type_hints(node).get(part)
        if hint is None or i == len(parts) - 1:
            return hint
        node = hint if dataclasses.is_dataclass(hint) else SUB_SCHEMAS.get((node, part))
    return None


def _options(hint: Any) -> list:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)]
    return [hint]


def takes_text(hint: Any) -> bool:
    """True for str fields and string choices (optional or not)."""
    return all(o is str or (typing.get_origin(o) is Literal
                            and all(isinstance(a, str) for a in typing.get_args(o)))
               for o in _options(hint))


def structured(hint: Any) -> bool:
    """True for list and mapping fields (optional or not)."""
    return hint is not None and any(o in (dict, list) or typing.get_origin(o) in (dict, list)
                                    for o in _options(hint))


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def from_dict(schema: type[T], data: dict, source: str, prefix: str = "") -> T:
    """Build dataclass ``schema`` from ``data``, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or '<top>'}' in {source} must be a mapping, "
                          f"got {shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in data:
        if key not in fields:
            raise ConfigError(unknown_key_message(prefix + str(key), list(fields), prefix, source))
    values = {}
    for name, value in data.items():
        hint = hints[name]
        full = prefix + name
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value or {}, source, full + ".")
        else:
            values[name] = coerce(value, hint, full, source)
    cfg = schema(**values)
    _check_section(cfg, prefix, source)
    return cfg


def unknown_key_message(key: str, valid: list[str], prefix: str, source: str) -> str:
    key = shown_text(key)
    leaf = key[len(prefix):]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return (f"unknown key '{key}' in {source}{hint} "
            f"(valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(valid)})")


def coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Return ``value`` checked (and gently converted) against type ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(value, option, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1]
    if origin is Literal:
        return choice(value, args, key, source)
    if hint is Any:
        return value
    if origin is list or hint is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise type_error(value, "a list", key, source)
        if args:
            return [coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
        return value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise type_error(value, "a mapping", key, source)
        check_colon_keys(value, key, source)
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise type_error(value, "true or false", key, source)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise type_error(value, "an integer", key, source)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        raise type_error(value, "a number", key, source)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise type_error(value, "a string", key, source)
    if value is None:
        raise type_error(value, getattr(hint, "__name__", str(hint)), key, source)
    return value


def choice(value: Any, choices: tuple, key: str, source: str) -> Any:
    if value in choices:
        return value
    close = difflib.get_close_matches(shown_text(str(value)), [str(a) for a in choices], n=1,
                                      cutoff=0.5)
    hint_text = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"bad value {shown(value)} for '{key}' in {source}{hint_text} "
                      f"(choose one of: {', '.join(str(a) for a in choices)})")


def type_error(value: Any, expected: str, key: str, source: str) -> ConfigError:
    return ConfigError(f"wrong type for '{key}' in {source}: expected {expected}, "
                       f"got {shown(value)}")


def to_dict(cfg: Any) -> dict:
    """The config as plain data (for YAML/JSON and store metadata)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (beside every output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write_text(path, text)
    return path
