"""The generic training engine: the only package that imports DeepSpeed (docs/engine.md).

Import-light on purpose: importing ``beit3.engine`` loads neither DeepSpeed nor torch.distributed state.
Modules: ``launch`` (process group), ``ds_config`` (DeepSpeed JSON), ``lr`` (schedules), ``task`` (the
protocol a trained module follows), ``optim`` (AdamW and the step guard), ``trainer`` and ``trainer_config``
(the loop and its settings), ``checkpoint``, ``consolidate``, ``metrics``, ``config_io`` (typed TOML recipes).
"""
