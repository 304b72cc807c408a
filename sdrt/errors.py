"""Typed errors. Every error a user can cause is an ``SdrtError``; the CLI prints its message on one
line and exits 2 (no traceback)."""


class SdrtError(Exception):
    """Base class of every sdrt error a user can act on."""

    exit_code = 2


class InputError(SdrtError, ValueError):
    """A request parameter is out of range (size, steps, strength, guidance, batch, ...)."""


class ImageInputError(InputError):
    """An input image or mask is missing, unreadable, not an image, or of the wrong size."""


class SchedulerNameError(InputError):
    """A scheduler name or ``_class_name`` sdrt does not know."""


class SchedulerConfigError(InputError):
    """A scheduler config key or value that changes the chosen scheduler's math and that sdrt does not implement."""


class ModelError(SdrtError):
    """A model folder is missing, unreadable, not a Stable Diffusion pipeline, or unsupported."""


class ArtifactError(SdrtError):
    """An ENGINE_DIR is missing, its manifest is invalid, or a file does not match the manifest."""


class OutputExistsError(SdrtError):
    """An output path exists and ``--force`` was not given."""


class ExportError(SdrtError):
    """Export failed (parity check, disk full, permission denied, ...)."""


class NumericsError(SdrtError):
    """NaN or inf appeared in a tensor; the message names the stage and step (fp16 overflow shows up so)."""


class Cancelled(SdrtError):
    """A per-step callback asked to stop."""
