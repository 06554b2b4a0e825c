"""pytest set-up: the `gpu` marker (tests marked gpu are skipped where CUDA is missing), the
tiny random models the image trainer's tests share (image_flow/tiny.py), the count of collected
tests (the front page states it) and the notebooks started beside the other tests.

    python -m pytest -q -m gpu                             # on a GPU machine: only the GPU tests
    G2RPO_GPU_TEST_DEVICE=cpu python -m pytest -q -m gpu   # dry run of their code on a CPU
"""

import os

import pytest
import torch

# One thread for every test process and what it starts (the command lines honour
# OMP_NUM_THREADS): tiny models run as fast on one, and the notebooks execute beside the other
# tests on the second core; two threads of one process on a busy core stall each other.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def prompt_cache(tmp_path_factory):
    """The trainer's prompt-embedding cache in a temporary folder (subprocesses inherit it)."""
    from image_flow.prompts import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("prompt-cache"))
    yield os.environ[CACHE_ENV]
    if before is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = before


def gpu_test_device():
    """The device the gpu tests run on: cuda, or G2RPO_GPU_TEST_DEVICE for a dry run."""
    return torch.device(os.environ.get("G2RPO_GPU_TEST_DEVICE", "cuda"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny random FluxPipeline saved with save_pretrained (read-only for the tests)."""
    from image_flow.tiny import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel with its tokenizer and image processor, saved."""
    from image_flow.tiny import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def tiny_hps(tmp_path_factory):
    """(checkpoint, architecture JSON): a tiny random OpenCLIP in HPS's checkpoint format."""
    from image_flow.tiny import make_tiny_hps

    return make_tiny_hps(tmp_path_factory.mktemp("hps"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (python -m pytest -q -m gpu)")


COLLECTED = pytest.StashKey[tuple]()


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselect anything
def pytest_collection_modifyitems(config, items):
    # (tests, GPU tests) collected from the given paths: the front page states them (test_docs).
    config.stash[COLLECTED] = (len(items), sum("gpu" in item.keywords for item in items))
    if gpu_test_device().type != "cuda" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run python -m pytest -q -m gpu on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Start the selected tests' work that can run beside the others (the notebooks: minutes)."""
    by_module = {}
    for item in session.items:
        by_module.setdefault(getattr(item, "module", None), []).append(item)
    for module, items in by_module.items():
        start = getattr(module, "start_beside_the_other_tests", None)
        if start is not None:
            start(session.config, items)
