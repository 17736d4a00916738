import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLE_DIR = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "slides"))
SVS = os.path.join(SAMPLE_DIR, "cmu_small_region.svs")
STRIP_TIFF = os.path.join(SAMPLE_DIR, "kidney-48-5.tif")
NDPI = os.path.join(SAMPLE_DIR, "fluorescence_dapi.ndpi")
FIXTURE = os.path.abspath(os.path.join(ROOT, "..", "shared", "fixtures", "scn_layer4.npz"))


def _import_triton_for_the_interpreter() -> None:
    """Without a GPU, Triton is imported once here in interpreter mode, before any test imports it.

    Triton fixes its mode when first imported, and other code imports it as a side effect (torch's Adam
    does, through torch._dynamo, on its first step): a test that ran an optimiser step before
    tests/test_kernels.py left Triton unable to interpret kernels there ("Cannot call @triton.jit'd
    outside of the scope of a kernel"). The variable is restored at once, so that everything else runs
    the torch twins as a user's CPU would."""
    import torch

    if torch.cuda.is_available():
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:  # the kernel tests say so (require_module)
        pass
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


_import_triton_for_the_interpreter()

# CI sets this: a test that would skip for missing data or a missing Triton fails instead, naming what it
# looked for, so that a run without ../shared cannot pass green by skipping. Locally, skips stay skips.
STRICT = os.environ.get("GIGASSL_TEST_STRICT") == "1"


def skip_or_fail(reason: str) -> None:
    if STRICT:
        pytest.fail(f"{reason} (GIGASSL_TEST_STRICT=1: required here)", pytrace=False)
    pytest.skip(reason)


def require_path(path: str, what: str) -> str:
    """`path` if it exists; else a skip (a fail under GIGASSL_TEST_STRICT=1) naming it."""
    if not os.path.exists(path):
        skip_or_fail(f"{what} not found at {path} (a user checkout has no ../shared)")
    return path


def require_module(name: str):
    """The imported module; else a skip (a fail under GIGASSL_TEST_STRICT=1) naming it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        skip_or_fail(f"module {name} does not import ({err})")


def cli(*args, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    """Runs `python -m gigassl_fast ARGS...` as a user would; output captured as text."""
    return subprocess.run([sys.executable, "-m", "gigassl_fast", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="session")
def sample_dir():
    for path in (SAMPLE_DIR, SVS, STRIP_TIFF, NDPI):
        require_path(path, "sample slides")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def fixtures():
    """The reference SparseConvNet outputs (../shared/fixtures/scn_layer4.npz)."""
    return np.load(require_path(FIXTURE, "reference fixtures"))


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory):
    """A 4096x3072 pyramidal JPEG TIFF at 0.5 mpp with planted tissue (2 levels)."""
    from gigassl_fast.synthetic import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("syn") / "syn.tif", 4096, 3072, mpp=0.5, seed=3)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """Three small synthetic slides in one folder."""
    from gigassl_fast.synthetic import write_synthetic_slide

    folder = tmp_path_factory.mktemp("cohort")
    for i in range(3):
        write_synthetic_slide(folder / f"s{i}.tif", 2048, 1536, mpp=0.5, seed=10 + i)
    return folder


def random_thumbnail(rng: np.random.Generator, h: int, w: int, tissue: bool) -> np.ndarray:
    """Noise, or a pale background with a few coloured blobs (tissue-like)."""
    if not tissue:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = np.full((h, w, 3), 238, np.int16)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(rng.integers(1, 6)):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, max(3, min(h, w) // 3))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(60, 210, 3)
    return np.clip(img + rng.integers(-30, 31, img.shape), 0, 255).astype(np.uint8)
