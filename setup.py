"""Packaging: installs the top-level folders under one import namespace, ``beit3``.

The repository keeps one job per top-level folder (``model/``, ``engine/``, ...). Installed, they become
``beit3.model``, ``beit3.engine``, ... so that no import name shadows another distribution
(``tokenizers`` is Hugging Face's, ``finetune`` is on PyPI). ``tokenizers/`` and ``finetune/`` carry no
``__init__.py`` for the same reason: run from the repository root, ``import tokenizers`` must not find them.

Torch is pinned for the CPU development and CI machines. A GPU cluster installs its own CUDA build of torch
first (``pip install torch --index-url https://download.pytorch.org/whl/cu124``) and then this package with
``BEIT3_TORCH_SPEC="torch>=2.4"`` in the environment, which relaxes the pin.
"""

import os

from setuptools import setup

FOLDERS = ("model", "engine", "pretrain", "finetune", "tokenizers")


def _packages() -> tuple[list[str], dict[str, str]]:
    """Every package under the mapped folders (namespace folders included), with its source directory."""
    packages, package_dir = [], {}
    root = os.path.dirname(os.path.abspath(__file__))
    for folder in FOLDERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            rel = os.path.relpath(dirpath, root)
            if rel != folder and not any(f.endswith(".py") for f in filenames):
                continue
            name = "beit3." + rel.replace(os.sep, ".")
            packages.append(name)
            package_dir[name] = rel
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()
TORCH = os.environ.get("BEIT3_TORCH_SPEC", "torch==2.13.0")

setup(
    name="beit3-pretrain",
    version="0.1.0",
    description="Pretraining (DeepSpeed ZeRO-3, Slurm) and finetuning of BEiT-3 Multiway Transformers",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={
        "beit3.pretrain": ["recipes/*.toml", "recipes/vqkd/*.toml"],
        "beit3.finetune": ["recipes/*.toml"],
    },
    install_requires=[
        TORCH,
        "deepspeed==0.19.8",
        "numpy",
        "sentencepiece==0.2.3",
        "webdataset==1.0.2",
        "tensorboard",
        "pillow",
        "safetensors",
        "tqdm",
        "imagehash==4.3.2",  # beit3-contamination's perceptual hashes (with PyWavelets and scipy)
    ],
    extras_require={
        # ruff pinned: CI checks format; pytest-xdist: scripts/test.sh runs the suite on two workers
        "dev": ["pytest", "pytest-timeout", "pytest-xdist==3.8.0", "ruff==0.17.6", "tokenizers"],
        # COCO caption scores (finetune/outputs.py); its PTB tokenizer and METEOR need a Java runtime
        "coco": ["pycocoevalcap==1.2"],
        # the released finetuning recipes' augmentation (finetune/data/augment.py): timm's transforms,
        # Mixup and CutMix, torchvision's crops. torchvision 0.28.0 requires torch 2.13.0: install it beside
        # the torch pin (scripts/install.sh) so that pip never resolves another torch
        "augment": ["timm==1.0.31", "torchvision==0.28.0"],
    },
    entry_points={
        "console_scripts": [
            "beit3-model-info=beit3.model.info:main",
            "beit3-spm=beit3.tokenizers.spm_cli:main",
            "beit3-vqkd=beit3.pretrain.vqkd_train:main",
            "beit3-shards=beit3.pretrain.shards:main",
            "beit3-contamination=beit3.pretrain.contamination:main",
            "beit3-pretrain=beit3.pretrain.train:main",
            "beit3-export=beit3.pretrain.export:main",
            "beit3-plan=beit3.pretrain.plan:main",
            "beit3-finetune=beit3.finetune.train:main",
            "beit3-finetune-index=beit3.finetune.index:main",
            "beit3-dense-data=beit3.finetune.dense.synthetic:main",
            "beit3-launch=beit3.engine.supervise:main",
        ]
    },
)
