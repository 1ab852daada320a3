"""A model factory that leaves marks, to prove whether a spec's code ran.

Importable as ``tests.marker_factories`` (the processes that load it need the project
root on ``PYTHONPATH``). When the environment variable :data:`MARKER_ENV` names a
file, importing this module appends ``imported`` to it and every call of
:func:`marked` appends ``called``: a test that finds no such file knows that neither
happened, in any process that had the variable.
"""

from __future__ import annotations

import os
from typing import Any

#: The environment variable naming the marker file.
MARKER_ENV = "FCN_TEST_MARKER"


def mark(what: str) -> None:
    """Append ``what`` to the marker file, if one is named."""
    path = os.environ.get(MARKER_ENV)
    if path:
        with open(path, "a") as stream:
            stream.write(f"{what} {os.getpid()}\n")


mark("imported")


def marked(in_channels: int = 3, num_classes: int = 3, width: int = 4) -> Any:
    """:func:`tests.modelspec_factories.tiny`, after marking the call."""
    from tests.modelspec_factories import tiny

    mark("called")
    return tiny(in_channels=in_channels, num_classes=num_classes, width=width)
