"""Packaging for keras-freetickets.

TensorFlow is not a core requirement: `tensorflow-cpu` does not satisfy a
`tensorflow` requirement, so the backend is chosen with an extra
(`pip install -e .[cpu]` or `.[gpu]`).
"""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).resolve().parent


def read_version():
    text = (HERE / "keras_freetickets" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("keras_freetickets/__init__.py does not define __version__")
    return match.group(1)


def read_long_description():
    readme = HERE / "README.md"
    return readme.read_text(encoding="utf-8") if readme.exists() else ""


EXTRAS = {
    # TensorFlow backend, CPU only (what the tests and CI use).
    "cpu": ["tensorflow-cpu>=2.16"],
    # TensorFlow backend with the CUDA libraries from pip.
    "gpu": ["tensorflow[and-cuda]>=2.16"],
    "test": ["pytest", "pytest-xdist", "hypothesis", "scikit-learn", "matplotlib"],
    "datasets": ["tensorflow-datasets", "scikit-learn"],
    "plots": ["matplotlib"],
    # Peer baseline (tfmot pruning). tf-keras depends on the full `tensorflow`
    # package: beside tensorflow-cpu install it with `pip install --no-deps tf-keras`.
    "tfmot": ["tensorflow-model-optimization==0.8.1", "tf-keras"],
    # Same --no-deps caveat as tfmot beside tensorflow-cpu.
    "serving": ["tensorflow-serving-api"],
}

setup(
    name="keras-freetickets",
    version=read_version(),
    description=(
        "FreeTickets for Keras 3: dynamic sparse training (RigL/SET) and "
        "DST/EDST ensembles of sparse networks."
    ),
    long_description=read_long_description(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_freetickets", "keras_freetickets.*"]),
    # The compiled selection op's source, built after install by
    # `python -m keras_freetickets.native build`.
    package_data={"keras_freetickets": ["_native/*.cc"]},
    python_requires=">=3.9",
    install_requires=["keras>=3.0", "absl-py", "numpy"],
    extras_require=EXTRAS,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
