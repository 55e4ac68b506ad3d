"""The base of every error ``beit3.engine`` raises (docs/architecture.md, "Errors").

Import-light, like the package: imports nothing.
"""


class EngineError(Exception):
    """An error of ``beit3.engine``: a bad recipe, DeepSpeed or optimizer setting, launch, or checkpoint.

    Each specific error also derives from ``ValueError`` (a bad setting) or ``RuntimeError`` (the world).
    """


class CheckpointError(EngineError, RuntimeError):
    """A checkpoint that cannot be found or read; the message says what to pass instead.

    Defined here, beside the base, so that every engine module raising it (checkpoint, safe_load, reshard)
    imports it without importing another of them: the engine's modules form no import cycle.
    """
