"""Errors raised by the model runtimes, under their own root :class:`ModelError`.

runtimes/ sits below mesh/ and never imports it; mesh.errors names this root among the
errors it expects (``mesh.errors.EXPECTED``).
"""

from __future__ import annotations

__all__ = [
    "ModelError",
    "MalformedModelError",
    "UnsupportedModelError",
    "ShardIntegrityError",
    "RuntimeUnavailableError",
    "SessionError",
]


class ModelError(Exception):
    """A model file, shard blob or manifest cannot be used."""


class MalformedModelError(ModelError, ValueError):
    """A GGUF file or manifest is truncated, corrupt or inconsistent."""


class UnsupportedModelError(ModelError):
    """A well-formed model uses an architecture, tensor type or feature we do not run."""


class ShardIntegrityError(ModelError):
    """A shard blob's bytes do not hash to the sha256 its manifest names."""


class RuntimeUnavailableError(ModelError):
    """The engine behind a runtime (onnxruntime, tinygrad, llama-cpp-python) is not installed
    or cannot run here."""


class SessionError(ModelError):
    """A session is unknown, closed, or asked to go past its context size."""
