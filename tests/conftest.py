"""Test setup: never touch the network (hub downloads fail fast), tiny CPU threads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

pytest.register_assert_rewrite("tests.helpers")  # before any test module imports it

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


_REAL_CUDA_AVAILABLE = torch.cuda.is_available


@pytest.fixture(scope="session", autouse=True)
def _cpu_unless_cuda_is_asked():
    """Tests run on the CPU on every machine (their tolerances and cache places assume it),
    module-scoped fixtures included; a test that takes the ``cuda`` fixture gets the GPU.
    Configs of tests that start subprocesses (torchrun, kills) say ``device: cpu``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture(scope="session", autouse=True)
def _index_key_of_the_session(tmp_path_factory):
    """FAISS indexes built by tests are tagged with a key made for the session (subprocesses
    inherit it), never the key of the user running them (~/.config/transferlab)."""
    os.environ["TRANSFERLAB_INDEX_KEY_FILE"] = str(tmp_path_factory.mktemp("key") / "index.key")


@pytest.fixture(scope="session", autouse=True)
def _graph_cache_of_the_session(tmp_path_factory):
    """Exported graphs (runtime.backend onnxruntime/openvino) go to a folder of the session,
    never the user's ~/.cache/transferlab."""
    os.environ["TRANSFERLAB_GRAPH_CACHE"] = str(tmp_path_factory.mktemp("graphs"))


@pytest.fixture
def cuda(monkeypatch):
    if not _REAL_CUDA_AVAILABLE():
        pytest.skip("needs a CUDA GPU (none here)")
    monkeypatch.setattr(torch.cuda, "is_available", _REAL_CUDA_AVAILABLE)
    return torch.device("cuda")
