"""The base of every error ``beit3.engine`` raises (docs/architecture.md, "Errors").

Import-light, like the package: imports nothing.
"""


class EngineError(Exception):
    """An error of ``beit3.engine``: a bad recipe, DeepSpeed or optimizer setting, launch, or checkpoint.

    Each specific error also derives from ``ValueError`` (a bad setting) or ``RuntimeError`` (the world).
    """
