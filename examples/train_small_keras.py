"""Train a small Keras landmark classifier on a Kaggle-layout folder (about a minute of CPU).

It stands in for "your own model" in the docs and the closing benchmarks: a few conv
layers, global max pooling (the embedding) and a softmax over the train landmarks. Its
accuracy is not the point; the commands that use it are the same for a ResNet50.

    python examples/train_small_keras.py ../shared/data/gldv2-mini-dev --out my_model
    # writes my_model/my.keras, my_model/my.h5, my_model/saved_model/ and my_model/classes.csv

Inputs are 128 px crops preprocessed with ``tf`` ([-1, 1]); use the model with
``--preprocess tf --image-size 128`` (the SavedModel also with ``--layer output_0 --head output_1``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

IMAGE_SIZE = 128


def load_training_set(data_dir: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Train photos resized to ``size * 1.25`` squares, labels as class indices, landmark per class."""
    from delf_retrieval.features.images import kaggle_image_path, load_image, read_labels_csv
    from delf_retrieval.models.keras_model import resize_to

    labels = read_labels_csv(data_dir / "train.csv")
    landmarks = sorted(set(labels.values()), key=lambda value: (len(value), value))
    index = {landmark: i for i, landmark in enumerate(landmarks)}
    big = round(size * 1.25)
    images, classes = [], []
    for image_id, landmark in sorted(labels.items()):
        image = load_image(kaggle_image_path(data_dir / "train", image_id))
        images.append(resize_to(image, big, big))
        classes.append(index[landmark])
    return np.stack(images), np.array(classes), landmarks


def augment(images: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random ``size`` crops, mirrored half of the time, brightness jitter; preprocessed to [-1, 1]."""
    from delf_retrieval.models.keras_model import preprocess

    out = np.empty((len(images), size, size, 3), np.float32)
    limit = images.shape[1] - size
    for i, image in enumerate(images):
        y, x = rng.integers(0, limit + 1, size=2)
        crop = image[y : y + size, x : x + size].astype(np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip(crop * rng.uniform(0.7, 1.3), 0, 255)
        out[i] = preprocess(crop, "tf")
    return out


def build_model(num_classes: int, seed: int = 0):
    """Four conv blocks -> global max pooling ('gmp', the embedding) -> softmax head."""
    import keras
    import tensorflow as tf

    # Seeds alone do not make training repeatable: TensorFlow's CPU kernels split their sums
    # over threads in any order. With op determinism the same seed trains the same weights.
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    inputs = keras.Input((None, None, 3))
    x = inputs
    for width in (16, 32, 64, 128):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalMaxPooling2D(name="gmp")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path, help="Kaggle-layout folder with train.csv + train/")
    parser.add_argument("--out", type=Path, default=Path("my_model"))
    parser.add_argument("--epochs", type=int, default=100, help="passes over the (augmented) train photos")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images, classes, landmarks = load_training_set(args.data_dir, IMAGE_SIZE)
    model = build_model(len(landmarks), args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        history = model.fit(augment(images, IMAGE_SIZE, rng), classes, batch_size=16, epochs=1, verbose=0)
        if epoch % 10 == 0:
            print(f"epoch {epoch}: loss {history.history['loss'][-1]:.3f}, accuracy {history.history['accuracy'][-1]:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / "my.keras")
    model.save(args.out / "my.h5")
    # The SavedModel exports the embedding and the probabilities: outputs output_0 and output_1.
    import keras

    both = keras.Model(model.inputs, [model.get_layer("gmp").output, model.output])
    both.export(str(args.out / "saved_model"), verbose=False)
    (args.out / "classes.csv").write_text(
        "class_index,landmark_id\n" + "".join(f"{i},{landmark}\n" for i, landmark in enumerate(landmarks))
    )
    print(f"trained {args.epochs} epochs in {time.perf_counter() - started:.0f} s on {len(images)} photos, {len(landmarks)} landmarks")
    print(f"wrote {args.out}/my.keras, my.h5, saved_model/, classes.csv")


if __name__ == "__main__":
    main()
