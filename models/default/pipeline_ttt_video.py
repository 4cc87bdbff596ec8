"""TTT-Video's pipeline, for `DiffusionPipeline.from_pretrained(folder, ...)`.

This folder lives in the TTT-Video repository and uses its code (pipeline, models, kernels), which must be
importable; `TTTVideoPipeline.save_pretrained` writes a copy that also carries the code, for use elsewhere.
"""

import importlib

TTTVideoPipeline = importlib.import_module("pipeline.pipeline_ttt_video").TTTVideoPipeline
