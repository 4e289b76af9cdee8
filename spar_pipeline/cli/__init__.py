"""The ``spar-pipeline`` command: thin typer wrappers that load the run and call a stage.

``common`` holds the app, the shared options and the one way errors are reported; ``stages``,
``images``, ``mini`` and ``use`` add their commands to it on import. Every stage reads the previous stage's
manifest, does only what is not done yet and can be rerun after any failure to finish the rest.
"""

from __future__ import annotations

from spar_pipeline.cli.common import app
from spar_pipeline.cli import images, mini, stages, use  # noqa: E402,F401 - each adds its commands to app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover
    app(prog_name="spar-pipeline")
