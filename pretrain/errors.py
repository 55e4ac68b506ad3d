"""The base of every error ``beit3.pretrain`` raises (docs/architecture.md, "Errors")."""


class PretrainError(Exception):
    """An error of ``beit3.pretrain``: a bad data configuration or stream, shards, demo data or export.

    Each specific error also derives from ``ValueError`` (a bad setting) or ``RuntimeError`` (the world).
    ``beit3.pretrain.data.decode.SkipSample`` is not one: it is the loader's verdict on one sample.
    """
