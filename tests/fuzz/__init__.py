"""A permanent, seeded generative fuzzer for fusedconv (issue 11).

* :mod:`.generator` writes random BatchNorm models as real Python source files;
* :mod:`.check` checks one model against every contract of ``fusedconv.fuse``;
* :mod:`.runner` runs many of them and summarises the failures.

Command line: ``python -m tests.fuzz --minutes M --seed S [--keep-failures DIR]``;
``python -m tests.fuzz --replay FILE`` checks one generated file again.
The imports are relative, so the package works both as ``tests.fuzz`` (from
the repository root) and as ``fuzz`` (with ``tests/`` on sys.path, as pytest has it).
"""

from .check import Failure, Result, check_file
from .generator import generate
from .runner import Summary, format_summary, fuzz

__all__ = ["Failure", "Result", "Summary", "check_file", "format_summary", "fuzz", "generate"]
