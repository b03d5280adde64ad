"""The models package's exception hierarchy: one base, a subclass per failure a caller handles."""

from __future__ import annotations


class ModelError(Exception):
    """Base of every error raised by the models package."""


class BundleNotFound(ModelError):
    """The bundle directory or one of its files is missing."""


class BundleCorrupt(ModelError):
    """The manifest is unreadable, or the files do not match it."""


class ExportError(ModelError):
    """A source model could not be read, cut, preprocessed, quantized or saved."""


class BadImage(ModelError, ValueError):
    """An image or crop that cannot be embedded: empty, not an image, truncated, too large, wrong type."""


class TuneError(ModelError):
    """A bundle that cannot be tuned (unsupported graph, too few items or images) or a tune that failed."""
