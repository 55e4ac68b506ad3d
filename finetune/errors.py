"""The base of every error ``beit3.finetune`` raises (docs/architecture.md, "Errors")."""


class FinetuneError(Exception):
    """An error of ``beit3.finetune``: a bad task configuration, task data, batch or reloaded checkpoint.

    Each specific error also derives from ``ValueError`` (a bad setting) or ``RuntimeError`` (the world).
    """


class BatchError(FinetuneError, ValueError):
    """A split that cannot fill one batch per rank, or a batch its task cannot be given."""
