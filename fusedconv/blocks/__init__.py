"""Drop-in re-parameterizable blocks: train with branches, deploy as one conv."""

from .base import RepBlock

__all__ = ["RepBlock"]
