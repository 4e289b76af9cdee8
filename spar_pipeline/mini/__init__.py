"""The miniature world: an application built on the pipeline, not part of it.

Generated scenes with exact labels (``scenes``), SA-1B-layout tar writers (``sa1b_writer``),
the pretraining of the shipped ``mini-clip`` weights (``pretrain``) and the small Table 1 run
(``world``). The pipeline's stages never import it; ``spar-pipeline run`` uses it only to
generate a source and a benchmark when given none.
"""
