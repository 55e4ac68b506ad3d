"""The base of every error ``beit3.model`` raises (docs/architecture.md, "Errors")."""


class ModelError(Exception):
    """An error of ``beit3.model``: a bad model configuration, input kind or weights file.

    Each specific error also derives from ``ValueError`` (a bad argument) or ``RuntimeError`` (a file).
    """
