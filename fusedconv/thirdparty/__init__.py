"""Converters for the re-parameterizable blocks of third-party model zoos.

Each module here registers its converters when imported; :mod:`fusedconv.registry`
imports it only once the zoo itself has been imported by the user.
"""
