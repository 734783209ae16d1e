"""Converters for the re-parameterizable blocks of third-party model zoos.

Each module here registers its converters by their classes' names
(:func:`fusedconv.registry.register_block_by_name`) when fusedconv is imported,
and imports nothing of its zoo: a converter takes effect once the user has
imported the zoo, with no import left for the first fold to pay.
"""

from . import timm, ultralytics  # noqa: F401  (registered on import)
