"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""


class EdgeMSDError(Exception):
    """A problem the user can fix: the message names the file/line/field and what was expected."""


class ConfigError(EdgeMSDError):
    """A config file, CLI option or target profile is wrong."""


class DataError(EdgeMSDError):
    """A dataset file, image or caption is missing, corrupt or of the wrong shape."""


class ArtifactError(EdgeMSDError):
    """An artifact (feature cache, checkpoint, export, bundle, report) is missing, foreign or tampered."""


class BadSampleError(DataError):
    """One image or caption cannot be read; ``--skip-bad`` skips such samples and counts them."""

    def __init__(self, message: str, image_index: int | None = None, caption_index: int | None = None):
        super().__init__(message)
        self.image_index = image_index
        self.caption_index = caption_index
