"""torch.hub entry point: a SPAR student (or any spar-pipeline backbone) in one line.

    torch.hub.load("PATH/TO/spar-pipeline", "spar", "exported/dir", source="local")
    torch.hub.load("PATH/TO/spar-pipeline", "spar", "runs/x:student", source="local", device="cuda")

The first argument after the entry name is what ``spar_pipeline.load`` takes: an exported folder,
a run (``RUN`` or ``RUN:STUDENT``), ``hf-hub:ORG/NAME``, a weights file (with ``backbone=``) or a
backbone name. (torch.hub keeps the keyword ``source`` for itself, hence the positional argument.)
"""

dependencies = ["torch", "open_clip", "timm", "safetensors", "huggingface_hub"]


def spar(path: str, backbone: str | None = None, device: str | None = None):
    """The student ``path`` names, as a Backbone with ``dense``, ``features`` and ``segment``."""
    from spar_pipeline import load

    return load(path, backbone=backbone, device=device)
