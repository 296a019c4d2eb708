"""Where matching runs: the CPU or a GPU seen by TensorFlow."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """``"cpu"`` or ``"gpu"`` for a MATCH_DEVICE setting.

    ``"auto"`` is ``"gpu"`` when TensorFlow is importable and lists a GPU, else ``"cpu"``;
    ``"gpu"`` without one raises ``RuntimeError``.
    """
    if device == "cpu":
        return "cpu"
    if device not in ("gpu", "auto"):
        raise ValueError(f"MATCH_DEVICE must be 'cpu', 'gpu' or 'auto', got {device!r}")
    has_gpu = _tensorflow_gpus() > 0
    if device == "gpu" and not has_gpu:
        raise RuntimeError("MATCH_DEVICE='gpu' but TensorFlow sees no GPU; use 'cpu' or 'auto'")
    return "gpu" if has_gpu else "cpu"


# --------------------------------------------------------------------------- TensorFlow
def _tensorflow_gpus() -> int:
    try:
        import tensorflow as tf
    except ImportError:
        return 0
    return len(tf.config.list_physical_devices("GPU"))


def tensorflow_device(where: str) -> str:
    """TensorFlow device string for ``"cpu"``/``"gpu"``."""
    return "/GPU:0" if where == "gpu" else "/CPU:0"
