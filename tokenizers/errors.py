"""The base of every error ``beit3.tokenizers`` raises (docs/architecture.md, "Errors").

``TokenizersError`` (plural: the package) is the base; ``beit3.tokenizers.text.TokenizerError`` is the text
tokenizer's own error, one of its subclasses.
"""


class TokenizersError(Exception):
    """An error of ``beit3.tokenizers``: a bad text or visual tokenizer, teacher, masking or image input.

    Each specific error also derives from ``ValueError``.
    """
