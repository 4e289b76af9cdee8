"""``python -m spar_pipeline.cli``: the same command as ``spar-pipeline``."""

from spar_pipeline.cli import main

main()
