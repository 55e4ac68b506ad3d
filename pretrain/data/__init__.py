"""The pretraining data pipeline: webdataset shards -> three endless streams -> masked mixed micro-batches.

``PretrainDataConfig`` is the recipe's ``[data]`` table; ``build_pretrain_loader`` gives one rank's loader
(docs/data.md).
"""

from beit3.pretrain.data.config import DataConfigError, DataStreamError, PretrainDataConfig, expand_shards
from beit3.pretrain.data.loader import PretrainLoader, build_pretrain_loader

__all__ = [
    "DataConfigError",
    "DataStreamError",
    "PretrainDataConfig",
    "PretrainLoader",
    "build_pretrain_loader",
    "expand_shards",
]
