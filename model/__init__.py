"""The BEiT-3 Multiway Transformer (pure PyTorch): presets, construction, parameter counts, checkpoints."""

from beit3.model.beit3 import BEiT3, BEiT3Model, ModalityError
from beit3.model.cache import KVCache
from beit3.model.checkpoint import (
    LoadReport,
    WeightsFileError,
    interpolate_vision_positions,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from beit3.model.config import ModelConfig, ModelConfigError
from beit3.model.errors import ModelError
from beit3.model.params import build_param_groups, count_parameters, layer_id_for_lr_decay, parameter_group
from beit3.model.registry import build_model, get_config, list_models, register

__all__ = [
    "BEiT3",
    "BEiT3Model",
    "KVCache",
    "LoadReport",
    "ModalityError",
    "ModelConfig",
    "ModelConfigError",
    "ModelError",
    "WeightsFileError",
    "build_model",
    "build_param_groups",
    "count_parameters",
    "get_config",
    "interpolate_vision_positions",
    "layer_id_for_lr_decay",
    "list_models",
    "load_checkpoint",
    "parameter_group",
    "read_state_dict",
    "register",
    "save_checkpoint",
]
