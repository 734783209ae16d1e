"""The generative fuzzer (tests/fuzz/, issue 11) on a fixed seed.

A fixed number of models, so that the run is the same on every machine; about
60 s on two cores. A time cap stops a much slower machine early (with a
warning) rather than hanging the suite. The failures are listed grouped by
kind, each with the smallest failing model; rerun one with
``python -m tests.fuzz --replay FILE`` (files are kept under pytest's tmp_path),
or the whole run with ``python -m tests.fuzz --seed 11 --models 700``.
"""

from __future__ import annotations

import sys
import warnings

import torch

from fuzz import format_summary, fuzz

SEED = 11
MODELS = 700
TIME_CAP_S = 240


def test_fuzz_fixed_seed(tmp_path):
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    modules_before = set(sys.modules)
    summary = fuzz(SEED, max_models=MODELS, max_seconds=TIME_CAP_S, keep_failures=str(tmp_path))

    # the fuzzer leaves no global state behind
    assert torch.get_default_dtype() == dtype and torch.get_num_threads() == threads
    assert not [m for m in set(sys.modules) - modules_before if m.startswith("_fusedconv_fuzz_")]

    if summary.models < MODELS:
        warnings.warn(f"fuzz: time cap reached after {summary.models} of {MODELS} models", stacklevel=1)
    assert summary.models > 0
    generator_bugs = [f for f in summary.failures if f.kind.startswith("generator bug")]
    assert not generator_bugs, "the fuzzer generated models that do not run:\n" + "\n".join(map(str, generator_bugs))
    assert not summary.failures, format_summary(summary)
