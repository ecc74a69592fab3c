"""Backbones from the Hugging Face Hub (``hf-hub:ORG/NAME``) and from timm model folders.

Both go through timm, which reads the repository's ``config.json``: the architecture (a name
in timm's own registry, so a file can never name code to run), its arguments and its
pretrained config, which becomes the preprocessing. Weights are safetensors, or torch files
loaded with ``weights_only=True`` (timm's loader).

- ``hf-hub:ORG/NAME[@REVISION]`` (timm's older ``hf_hub:`` spelling too): downloaded once
  into the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1``
  only the cache is read. ``pretrained: false`` still reads ``config.json`` (the architecture)
  but initialises the weights randomly.
- a folder holding ``config.json`` and ``model.safetensors`` (what ``timm.models.save_for_hf``
  and ``push_to_hf_hub`` write): read offline, with its weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import MAX_CLASSES, MAX_IN_CHANS, MAX_INPUT_SIDE, ModelConfig
from ..errors import ModelError
from ..runtime.untrusted import claimed_size, read_bounded
from ..yamlsafe import loads_json, shown
from .checkpoint import check_witness, safetensors_shapes

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
FOLDER_CONFIG = "config.json"
FOLDER_WEIGHTS = "model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # timm's config.json is a few kB


def is_hub_name(name: str) -> bool:
    return name.lower().startswith(HUB_PREFIXES)


def hub_id(name: str) -> str:
    """``ORG/NAME[@REV]`` of a hub name; an error for anything that is not one."""
    repo = name.split(":", 1)[1] if is_hub_name(name) else ""
    if repo.count("/") != 1 or not all(repo.split("@", 1)[0].split("/")):
        raise ModelError(f"'{name}' is not a Hub model name; write it as hf-hub:ORG/NAME, "
                         "e.g. hf-hub:timm/vit_small_patch14_dinov2.lvd142m")
    return repo


def is_model_folder(name: str) -> bool:
    """A local folder in timm's Hub layout (config.json beside the weights)."""
    return (Path(name).expanduser() / FOLDER_CONFIG).is_file()


def timm_name(name: str) -> str:
    """The name timm.create_model takes for a hub name or a model folder."""
    if is_hub_name(name):
        return f"hf-hub:{hub_id(name)}"
    return f"local-dir:{Path(name).expanduser().resolve()}"


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def not_fetched(name: str, exc: Exception) -> ModelError:
    """The one-line 'could not fetch' error, naming the cache and the offline way out."""
    why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else \
        type(exc).__name__
    mode = "offline (HF_HUB_OFFLINE=1) and " if offline() else ""
    return ModelError(
        f"could not fetch '{name}' from the Hugging Face Hub ({why}); {mode}no copy in the "
        f"cache {hub_cache()} (set HF_HOME or HF_HUB_CACHE to the cache that holds it), or "
        "download the repository elsewhere and set model.name to its folder "
        "(config.json + model.safetensors), or set model.weights to a weights file")


def reads_weights(cfg: ModelConfig) -> bool:
    """Whether timm reads the weights of ``cfg``: a folder carries its weights; a hub name
    downloads them only when asked to; ``model.weights`` replaces both."""
    return (not is_hub_name(cfg.name) or cfg.pretrained) and not cfg.weights


def create(cfg: ModelConfig, kwargs: dict) -> object:
    """``timm.create_model`` for a hub name or a folder; errors become one ModelError line."""
    import timm

    name = timm_name(cfg.name)
    folder = not is_hub_name(cfg.name)
    pretrained = reads_weights(cfg)
    check_config(cfg)  # the sizes config.json claims, before timm builds from them
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        if folder:
            raise ModelError(f"timm could not build the model folder {cfg.name} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); it needs "
                             "the config.json and model.safetensors that timm's save_for_hf "
                             "writes") from None
        if is_fetch_error(exc):
            raise not_fetched(cfg.name, exc) from None
        raise ModelError(f"timm could not build '{cfg.name}': "
                         f"{str(exc).splitlines()[0][:200]}") from None


def config_file(cfg: ModelConfig) -> tuple[Path, Path | None]:
    """(config.json, the folder it must stay inside) of a model folder or a Hub name (the
    Hub's file: fetched into the Hugging Face cache, as timm would fetch it)."""
    if not is_hub_name(cfg.name):
        folder = Path(cfg.name).expanduser()
        return folder / FOLDER_CONFIG, folder
    from timm.models._hub import download_from_hf

    try:
        return Path(download_from_hf(hub_id(cfg.name), FOLDER_CONFIG)), None
    except Exception as exc:  # huggingface_hub's errors; the one line names the way out
        if is_fetch_error(exc):
            raise not_fetched(cfg.name, exc) from None
        raise


def check_config(cfg: ModelConfig) -> dict:
    """config.json of a model folder or a Hub model, read bounded (a regular file of at most
    ``MAX_CONFIG_BYTES``, nesting bounded), with every size it claims checked before timm
    builds anything from it: num_classes, model_args (num_classes, in_chans, img_size) and
    the pretrained config's input sizes. A folder's claimed class count must be one its
    model.safetensors holds (read from the header). Returns the parsed config."""
    path, folder = config_file(cfg)
    origin = f"{path}"
    raw = read_bounded(path, MAX_CONFIG_BYTES, "model config", ModelError, folder)
    data = loads_json(raw, f"model config {path}", ModelError)
    pretrained = data.get("pretrained_cfg", data) if isinstance(data, dict) else None
    model_args = (data.get("model_args") or {}) if isinstance(data, dict) else None
    if not isinstance(pretrained, dict) or not isinstance(model_args, dict):
        raise ModelError(f"model config {path} is not timm's config.json (an object with "
                         "architecture, pretrained_cfg and model_args); re-save the folder "
                         "with timm's save_for_hf")
    classes = data.get("num_classes", pretrained.get("num_classes"))
    if classes is not None:
        claimed_size(classes, MAX_CLASSES, f"{origin}: num_classes", ModelError)
    for key, limit, low in (("num_classes", MAX_CLASSES, 0), ("in_chans", MAX_IN_CHANS, 1)):
        if model_args.get(key) is not None:
            claimed_size(model_args[key], limit, f"{origin}: model_args.{key}", ModelError, low)
    size = model_args.get("img_size")
    if size is not None:
        for side in size if isinstance(size, (list, tuple)) else [size]:
            claimed_size(side, MAX_INPUT_SIDE, f"{origin}: model_args.img_size", ModelError, 1)
    for key in ("input_size", "test_input_size", "min_input_size"):
        check_input_size(pretrained.get(key), f"{origin}: pretrained_cfg.{key}")
    weights = folder / FOLDER_WEIGHTS if folder is not None else None
    claimed = model_args.get("num_classes", classes)
    if claimed and weights is not None and weights.is_file() and not cfg.weights:
        check_witness(safetensors_shapes(weights, folder), claimed,
                      "a classifier of num_classes", f"the model folder {cfg.name}")
    return data


def check_input_size(value: Any, what: str) -> None:
    """A (C, H, W) input size of a pretrained config: channels and sides bounded."""
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ModelError(f"{what} is {shown(value)}, not [C, H, W]; the file was not written "
                         "by timm or was altered")
    claimed_size(value[0], MAX_IN_CHANS, what + " channels", ModelError, 1)
    for side in value[1:]:
        claimed_size(side, MAX_INPUT_SIDE, what + " side", ModelError, 1)


def is_fetch_error(exc: Exception) -> bool:
    """Whether ``exc`` says the file could not be had (no network, not cached, no repo)."""
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - timm needs huggingface_hub for hf-hub names
        return isinstance(exc, OSError)
    kinds = tuple(getattr(hf_errors, n) for n in (
        "LocalEntryNotFoundError", "OfflineModeIsEnabled", "RepositoryNotFoundError",
        "EntryNotFoundError", "RevisionNotFoundError", "HfHubHTTPError") if hasattr(hf_errors, n))
    return isinstance(exc, (*kinds, OSError, ConnectionError))


def data_config(model: object) -> dict:
    """The preprocessing the repository's config.json gives (timm's resolved data config)."""
    import timm

    return dict(timm.data.resolve_model_data_config(model))


def recorded_architecture(cfg: ModelConfig) -> dict:
    """The architecture a checkpoint records to rebuild this model offline, from timm alone:
    the registry name and arguments of config.json (not the hub name, which needs the cache)."""
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    try:
        if is_hub_name(cfg.name):
            _, arch, model_args = load_model_config_from_hf(hub_id(cfg.name))
        else:
            _, arch, model_args = load_model_config_from_path(Path(cfg.name).expanduser())
    except (OSError, ValueError, KeyError) as exc:
        raise not_fetched(cfg.name, exc) from None
    return {"name": arch, "source": "timm", "kwargs": {**(model_args or {}), **cfg.kwargs}}

