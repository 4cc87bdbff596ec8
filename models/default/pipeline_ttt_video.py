"""TTT-Video's pipeline, for `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

diffusers copies this file into its modules cache and runs it there, so it cannot bring the rest of the code along:
it imports the TTT-Video packages (pipeline, models, kernels), which must be importable (the repository on
PYTHONPATH, or the current directory when run from the repository root). Written by TTTVideoPipeline.save_pretrained.
"""

import importlib

try:
    TTTVideoPipeline = importlib.import_module("pipeline.pipeline_ttt_video").TTTVideoPipeline
except ImportError as e:
    raise ImportError(
        "this folder holds a TTT-Video pipeline, whose code is the TTT-Video repository's packages (pipeline, models, "
        f"kernels); put the repository on PYTHONPATH (or run from its root) and load again ({e})"
    ) from e
