"""The base of every error ``beit3.finetune`` raises (docs/architecture.md, "Errors")."""


class FinetuneError(Exception):
    """An error of ``beit3.finetune``: a bad task configuration, task data, batch or reloaded checkpoint.

    Each specific error also derives from ``ValueError`` (a bad setting) or ``RuntimeError`` (the world).
    """
