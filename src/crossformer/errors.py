"""The library's error family: what a user got wrong, or a file that cannot be used.

Every error the library raises for bad arguments, inputs, configs or files is a
:class:`CrossFormerError`; the ``crossformer`` command prints it as one line and exits with
status 2. Anything else is a bug and keeps its traceback. Each class also derives from the
built-in exception a Python user would catch for it (``ValueError``, ``FileNotFoundError``...).
"""

__all__ = ['CrossFormerError', 'ConfigError', 'CheckpointError', 'InputError', 'MissingFileError',
           'MissingExtraError', 'DivergedError', 'WriteError']


class CrossFormerError(Exception):
    """Base class: a user mistake or an unusable file, described in one line."""


class ConfigError(CrossFormerError, ValueError):
    """A constructor argument, training config, override or command-line value that cannot be used."""


class InputError(CrossFormerError, ValueError):
    """A tensor or image given to a model that it does not accept."""


class CheckpointError(CrossFormerError, ValueError):
    """A weights, snapshot or model-folder file that cannot be read safely or does not fit the model."""


class MissingFileError(CrossFormerError, FileNotFoundError):
    """A file or folder named by the user that does not exist."""


class MissingExtraError(CrossFormerError, ImportError):
    """An optional dependency that a feature needs is not installed; says which extra brings it."""


class DivergedError(CrossFormerError, FloatingPointError):
    """Training produced a loss that is not finite: a setting (learning rate, clipping) to change."""


class WriteError(CrossFormerError, OSError):
    """A file or folder that could not be written (full disk, no permission); nothing was changed."""
