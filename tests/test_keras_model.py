"""Your own Keras/TF model as the global stage: preprocessing, pooling, formats, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from delf_retrieval.features.images import list_images
from delf_retrieval.features.store import FeatureStore, StoreMismatchError
from delf_retrieval.models import load_extractor
from delf_retrieval.models.extract import extract_to_store
from delf_retrieval.models.keras_model import KerasOptions, pool_map, preprocess, target_size
from delf_retrieval.models.loader import detect_format

PIXEL = np.array([[[10, 20, 30]]], np.uint8)  # one RGB pixel


# --- preprocessing and pooling: hand-computed values ----------------------------------------


def test_preprocessing_modes_on_one_pixel() -> None:
    np.testing.assert_allclose(preprocess(PIXEL, "caffe")[0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-6)
    torch = [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225]
    np.testing.assert_allclose(preprocess(PIXEL, "torch")[0, 0], torch, rtol=1e-5)
    np.testing.assert_allclose(preprocess(PIXEL, "tf")[0, 0], [10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1], rtol=1e-6)
    np.testing.assert_allclose(preprocess(PIXEL, "0-1")[0, 0], [10 / 255, 20 / 255, 30 / 255], rtol=1e-6)
    np.testing.assert_array_equal(preprocess(PIXEL, "0-255")[0, 0], [10.0, 20.0, 30.0])
    assert preprocess(PIXEL, "caffe").dtype == np.float32
    with pytest.raises(ValueError, match="unknown preprocessing 'imagenet'"):
        preprocess(PIXEL, "imagenet")


@pytest.mark.slow  # imports TensorFlow
@pytest.mark.parametrize("mode", ["caffe", "torch", "tf"])
def test_preprocessing_matches_keras_applications(mode: str) -> None:
    from keras.applications import imagenet_utils

    image = data.astronaut()[:32, :48]
    expected = imagenet_utils.preprocess_input(image.astype(np.float32), mode=mode)
    np.testing.assert_allclose(preprocess(image, mode), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_pooling_on_a_hand_made_map() -> None:
    maps = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(pool_map(maps, "max"), [[4.0]])
    np.testing.assert_allclose(pool_map(maps, "avg"), [[2.5]])
    np.testing.assert_allclose(pool_map(maps, "gem", 3.0), [[(100 / 4) ** (1 / 3)]], rtol=1e-6)
    np.testing.assert_allclose(pool_map(maps, "gem", 1.0), [[2.5]], rtol=1e-6)
    # GeM clamps at 1e-6 (cirtorch), so negative activations count as ~0.
    negative = np.array([-8.0, 8.0], np.float32).reshape(1, 1, 2, 1)
    np.testing.assert_allclose(pool_map(negative, "gem", 3.0), [[(512 / 2) ** (1 / 3)]], rtol=1e-5)


def test_target_sizes() -> None:
    fixed = KerasOptions(image_size=192)
    assert target_size((480, 640), fixed) == (192, 192)
    assert target_size((480, 640), fixed, 0.5) == (96, 96)
    assert target_size((480, 640), KerasOptions(image_size=(100, 200))) == (100, 200)
    longest = KerasOptions(image_size=320, resize="longest")
    assert target_size((480, 640), longest) == (240, 320)
    assert target_size((100, 50), longest) == (100, 50)  # a cap: small images are not enlarged
    assert target_size((100, 50), longest, 2.0) == (200, 100)


def test_option_errors() -> None:
    with pytest.raises(ValueError, match=r"pooling='median' \(choose one of gem, max, avg\)"):
        KerasOptions(pooling="median")
    with pytest.raises(ValueError, match="unknown Keras model option"):
        KerasOptions.from_mapping({"pool": "gem"})


# --- a small model: descriptors against keras.Model computed independently -----------------


def _expected(model_file: Path, layer: str, image: np.ndarray, size: tuple[int, int], mode: str, pool=None) -> np.ndarray:
    """keras.Model(inputs, layer.output) on the image resized with cv2 (area) and preprocessed."""
    import keras

    model = keras.models.load_model(model_file, compile=False)
    cut = keras.Model(model.inputs, model.get_layer(layer).output)
    resized = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA).astype(np.float32)
    if mode == "tf":
        x = resized / 127.5 - 1.0
    else:  # caffe
        x = resized[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
    out = np.asarray(cut.predict(x[None], verbose=0))[0]
    if pool is not None:
        out = pool(out)
    return out / np.linalg.norm(out)


def test_default_descriptor_is_the_input_of_the_softmax_layer(keras_classifier: Path) -> None:
    extractor = load_extractor(keras_classifier / "model.keras", preprocess="tf", image_size=64)
    assert extractor.family == "keras" and extractor.global_dim == 16 and extractor.num_classes == 5
    assert not extractor.has_local and extractor.has_global
    image = data.astronaut()
    got = extractor.extract(image).global_descriptor
    np.testing.assert_allclose(got, _expected(keras_classifier / "model.keras", "gmp", image, (64, 64), "tf"), atol=1e-5)
    assert got.dtype == np.float32 and abs(np.linalg.norm(got) - 1) < 1e-5


def test_named_4d_layer_is_gem_pooled(keras_classifier: Path) -> None:
    extractor = load_extractor(keras_classifier / "model.keras", layer="conv2", pooling="gem", gem_p=2.0, image_size=(48, 80), preprocess="caffe")
    image = data.chelsea()

    def gem2(maps: np.ndarray) -> np.ndarray:  # independent GeM, p = 2, over [h, w, C]
        return np.sqrt(np.mean(np.maximum(maps, 1e-6) ** 2, axis=(0, 1)))

    expected = _expected(keras_classifier / "model.keras", "conv2", image, (48, 80), "caffe", gem2)
    np.testing.assert_allclose(extractor.extract(image).global_descriptor, expected, atol=1e-5)


def test_multiscale_and_flip_average_normalised_descriptors(keras_classifier: Path) -> None:
    extractor = load_extractor(keras_classifier / "model.keras", preprocess="tf", image_size=64, scales=(0.75, 1.0), flip=True)
    image = data.coffee()
    total = np.zeros(16)
    for size in (48, 64):
        for flipped in (False, True):
            view = image[:, ::-1].copy() if flipped else image  # mirroring commutes with resizing
            total += _expected(keras_classifier / "model.keras", "gmp", view, (size, size), "tf")
    np.testing.assert_allclose(extractor.extract(image).global_descriptor, total / np.linalg.norm(total), atol=1e-5)


def test_longest_side_cap_keeps_the_aspect(keras_classifier: Path) -> None:
    extractor = load_extractor(keras_classifier / "model.keras", preprocess="tf", image_size=100, resize="longest")
    image = data.astronaut()[:, :256]  # 512 x 256
    expected = _expected(keras_classifier / "model.keras", "gmp", image, (100, 50), "tf")
    np.testing.assert_allclose(extractor.extract(image).global_descriptor, expected, atol=1e-5)
    # Images of different sizes in one batch give what they give alone.
    images = [image, data.chelsea(), data.coffee()]
    batched = [f.global_descriptor for f in extractor.extract_many(images)]
    alone = [extractor.extract(i).global_descriptor for i in images]
    np.testing.assert_allclose(batched, alone, atol=1e-6)


def test_three_formats_give_the_same_descriptors(keras_classifier: Path) -> None:
    assert detect_format(keras_classifier / "saved_model") == "keras"
    images = [data.astronaut(), data.chelsea(), data.rocket()]
    results = {}
    for name, options in (
        ("model.keras", {}),
        ("model.h5", {}),
        ("saved_model", {"layer": "output_0", "head": "output_1"}),
    ):
        extractor = load_extractor(keras_classifier / name, preprocess="caffe", image_size=72, **options)
        results[name] = (
            np.stack([f.global_descriptor for f in extractor.extract_many(images)]),
            extractor.class_probabilities(images),
        )
    for name in ("model.h5", "saved_model"):
        np.testing.assert_allclose(results[name][0], results["model.keras"][0], atol=1e-5)
        np.testing.assert_allclose(results[name][1], results["model.keras"][1], atol=1e-5)
    np.testing.assert_allclose(results["model.keras"][1].sum(axis=1), 1.0, rtol=1e-5)


def test_batched_store_equals_single_image_extraction(keras_classifier: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    photos = {"a": data.astronaut(), "b": data.chelsea(), "c": data.coffee(), "d": data.rocket(), "e": data.camera()}
    for name, photo in photos.items():
        cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(photo if photo.ndim == 3 else np.dstack([photo] * 3), cv2.COLOR_RGB2BGR))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    extractor = load_extractor(keras_classifier / "model.keras", preprocess="tf", image_size=64, batch_size=2)
    store = FeatureStore(tmp_path / "store", extractor.fingerprint())
    summary = extract_to_store(extractor, list_images(folder), store, batch_size=3, progress=False)
    assert (summary.extracted, summary.failed) == (5, 1)
    from delf_retrieval.features.images import load_image

    for name in photos:
        alone = extractor.extract(load_image(folder / f"{name}.png")).global_descriptor
        np.testing.assert_allclose(store.global_descriptors()[store.row(name)], alone, atol=1e-6)


def test_fingerprint_covers_every_option_and_the_store_refuses_others(keras_classifier: Path, tmp_path: Path) -> None:
    base = load_extractor(keras_classifier / "model.keras", preprocess="tf", image_size=64)
    variants = [
        {"preprocess": "caffe", "image_size": 64},
        {"preprocess": "tf", "image_size": 96},
        {"preprocess": "tf", "image_size": 64, "flip": True},
        {"preprocess": "tf", "image_size": 64, "layer": "conv2"},
        {"preprocess": "tf", "image_size": 64, "layer": "conv2", "pooling": "max"},
        {"preprocess": "tf", "image_size": 64, "layer": "conv2", "gem_p": 4.0},
        {"preprocess": "tf", "image_size": 64, "scales": (1.0, 0.5)},
        {"preprocess": "tf", "image_size": 64, "resize": "longest"},
    ]
    keys = {str(base.fingerprint())} | {str(load_extractor(keras_classifier / "model.keras", **v).fingerprint()) for v in variants}
    assert len(keys) == len(variants) + 1
    # The model batch size only changes speed: a store may be resumed with another one.
    assert load_extractor(keras_classifier / "model.keras", preprocess="tf", image_size=64, batch_size=5).fingerprint() == base.fingerprint()
    FeatureStore(tmp_path / "s", base.fingerprint())
    other = load_extractor(keras_classifier / "model.keras", preprocess="caffe", image_size=64)
    with pytest.raises(StoreMismatchError, match="preprocess"):
        FeatureStore(tmp_path / "s", other.fingerprint())


def test_composite_takes_global_from_one_model_and_local_from_another(keras_classifier: Path, tmp_path: Path) -> None:
    keras_only = load_extractor(keras_classifier / "model.keras", preprocess="tf", image_size=64)
    sift = load_extractor("opencv-sift")
    both = load_extractor(global_model=keras_classifier / "model.keras", local_model="opencv-sift", preprocess="tf", image_size=64)
    assert (both.family, both.has_local, both.has_global) == ("keras+opencv-sift", True, True)
    assert (both.global_dim, both.local_dim) == (16, 128)
    image = data.astronaut()
    features = both.extract(image)
    np.testing.assert_array_equal(features.global_descriptor, keras_only.extract(image).global_descriptor)
    np.testing.assert_array_equal(features.local.descriptors, sift.extract(image).local.descriptors)
    fingerprint = both.fingerprint()
    assert fingerprint["global_model"] == keras_only.fingerprint() and fingerprint["local_model"] == sift.fingerprint()
    FeatureStore(tmp_path / "s", fingerprint)
    fewer = dataclasses.replace(sift.params, max_feature_num=50)
    for other in (keras_only, sift, load_extractor(global_model=keras_only, local_model=load_extractor("opencv-sift", fewer))):
        with pytest.raises(StoreMismatchError):
            FeatureStore(tmp_path / "s", other.fingerprint())


# --- bad models and options give clear errors ---------------------------------------------


@pytest.mark.slow  # builds a Keras model (TensorFlow)
def test_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    fake = tmp_path / "model.keras"
    fake.write_bytes(b"this is not a zip file")
    with pytest.raises(ValueError, match=r"could not be opened as a Keras model"):
        load_extractor(fake)
    text = tmp_path / "weights.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"not a folder; expected a SavedModel folder or a Keras model file"):
        load_extractor(text)


def test_missing_layer_suggests_close_names(keras_classifier: Path) -> None:
    with pytest.raises(ValueError, match=r"no layer named 'conv3'; did you mean 'conv2', 'conv1'\?"):
        load_extractor(keras_classifier / "model.keras", layer="conv3")
    with pytest.raises(ValueError, match=r"no output 'embedding' \(layer\)"):
        load_extractor(keras_classifier / "saved_model", layer="embedding")


@pytest.mark.slow  # builds a Keras model (TensorFlow)
def test_model_without_a_usable_output(tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    outputs = keras.layers.Reshape((-1, 4), name="tokens")(x)  # 3-D [batch, N, 4]
    path = tmp_path / "tokens.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ValueError, match=r"the model output has shape \(None, None, 4\) \(rank 3\); a global descriptor needs a 2-D"):
        load_extractor(path)
    keras.Model(inputs, outputs).export(str(tmp_path / "tokens_sm"), verbose=False)
    with pytest.raises(ValueError, match="no 2-D or 4-D output"):
        load_extractor(tmp_path / "tokens_sm")


@pytest.mark.slow  # builds a Keras model (TensorFlow)
def test_fixed_input_models_and_options_for_other_models(tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    path = tmp_path / "fixed.keras"
    keras.Model(inputs, outputs).save(path)
    assert load_extractor(path).options.image_size == 32  # the model's own size by default
    with pytest.raises(ValueError, match="fixed 32x32 input"):
        load_extractor(path, image_size=64)
    with pytest.raises(ValueError, match="apply to Keras/TF models only"):
        load_extractor("opencv-sift", layer="gmp")
    with pytest.raises(ValueError, match="either spec, or both global_model and local_model"):
        load_extractor(global_model=path)


def test_delg_exports_are_not_taken_for_keras_models(delg_tf2_model: Path) -> None:
    assert detect_format(delg_tf2_model) == "delg-tf2"


@pytest.mark.slow  # builds a Keras model (TensorFlow)
def test_layer_inside_a_nested_model_is_explained(tmp_path: Path) -> None:
    import keras

    inner_input = keras.Input((None, None, 3))
    base = keras.Model(inner_input, keras.layers.Conv2D(4, 3, name="inner_conv")(inner_input), name="backbone")
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalMaxPooling2D(name="gmp")(base(inputs)))
    path = tmp_path / "nested.keras"
    keras.Model(inputs, outputs).save(path)
    assert load_extractor(path, image_size=32).global_dim == 4  # the default layer still works
    with pytest.raises(ValueError, match="'inner_conv' is inside the nested model 'backbone'"):
        load_extractor(path, layer="inner_conv")
