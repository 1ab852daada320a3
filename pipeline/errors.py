"""The exception tree: one root, subclasses that say what went wrong.

Each class also subclasses the builtin a caller would naturally catch, so
``except ValueError`` around a bad argument keeps working.
"""


class PipelineError(Exception):
    """Root of every error raised on purpose by fcn-pipeline."""


class ModelAnalysisError(PipelineError, ValueError):
    """A model contains an operation whose receptive field cannot be derived."""


class GeometryError(PipelineError, ValueError):
    """Tile geometry cannot be built from the given shapes and sizes."""


class ModelError(PipelineError):
    """A model or its spec cannot be loaded or used."""


class ModelSpecError(ModelError, ValueError):
    """A model spec file is invalid; the message names the field."""


class ConfigError(PipelineError, ValueError):
    """Invalid run configuration; the message names the setting."""


class SceneError(PipelineError):
    """A scene cannot be used; the message names the file and the cause."""


class SceneFormatError(SceneError, ValueError):
    """A scene, or a file it would make GDAL read, is of a format the run does not read
    (a VRT without ``--allow-vrt``, PNG, JPEG...), or reaches beyond local files."""


class SceneLimitError(SceneError, ConfigError):
    """A scene's header asks for more than a resource limit allows (bands, pixels, memory
    of one window): a usage error naming the scene, the figure, the limit and its setting."""


class SceneReadError(SceneError, OSError):
    """A scene, or one of its blocks, cannot be read."""


class OutputError(PipelineError, OSError):
    """An output cannot be written."""


class SceneChangedError(SceneReadError):
    """A scene file was modified or replaced while the run was reading it."""


class RunEnded(OutputError):
    """A task of a run that has ended (interrupted, or superseded) refused to write."""
