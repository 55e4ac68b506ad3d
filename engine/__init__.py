"""The generic training engine: the only package that imports DeepSpeed (docs/engine.md).

Import-light on purpose: importing ``beit3.engine`` loads neither DeepSpeed nor torch.distributed state.
Modules: ``launch`` (process group), ``ds_config`` (DeepSpeed JSON), ``lr`` (schedules), ``task`` (the
protocol a trained module follows), ``trainer`` (the loop), ``checkpoint``, ``consolidate``, ``metrics``.
"""
