"""The generic training engine: the only package that imports DeepSpeed (docs/engine.md).

Import-light on purpose: importing ``beit3.engine`` loads neither DeepSpeed nor torch.distributed state.
Modules: ``launch`` (process group), ``ds_config`` (DeepSpeed JSON), ``lr`` (schedules), ``task`` (the
protocol a trained module follows), ``optim`` (AdamW and the step guard), ``trainer`` and ``trainer_config``
(the loop and its settings), ``checkpoint`` (verified saves and resume), ``reshard`` (resume on another world
size), ``safe_load`` (checkpoint files that cannot run code), ``supervise`` (``beit3-launch``), ``watchdog``
(hangs), ``consolidate``, ``metrics``, ``config_io`` (typed TOML recipes), ``errors`` (``EngineError``, the
base of every error the engine raises).
"""

from beit3.engine.errors import EngineError

__all__ = ["EngineError"]
