"""Exceptions and warnings raised by fusedconv."""


class FoldError(ValueError):
    """A model, layer or BatchNorm that fusedconv was asked to fold cannot be folded.

    The message names the module (by its qualified name) and what is wrong with it.
    When it is raised, the caller's model has not been modified.
    """


class FoldWarning(UserWarning):
    """A BatchNorm was left unfolded for a reason the user may want to act on
    (no running statistics, or part of the model could not be traced)."""


class BackendUnavailable(RuntimeError):
    """A kernel backend asked for by name cannot run here; the message says why.

    Also importable as ``fusedconv.kernels.BackendUnavailable``.
    """


class MissingExtensionWarning(UserWarning):
    """fusedconv's compiled kernels (the ``fusedconv._C`` extension) could not be
    loaded, so a fold ran on the slower plain-PyTorch kernels instead. Emitted
    once per process; the message says why and which command rebuilds it.
    The results are the same bits either way."""


class ExtensionBuildWarning(UserWarning):
    """The compiled kernels were not built at install time and are being compiled
    now, on first use (about a minute, once: later processes load the cached
    build). Not a fallback: the fold then runs on them."""
