"""TTT-Video's pipeline, for `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

diffusers copies this file into its modules cache and runs it there. It imports the TTT-Video packages (pipeline,
models, kernels) from the repository when they are importable, else from ttt_video_code.py, the code as of the export
that diffusers copies along. Written by TTTVideoPipeline.save_pretrained.
"""

import importlib

try:
    TTTVideoPipeline = importlib.import_module("pipeline.pipeline_ttt_video").TTTVideoPipeline
except ModuleNotFoundError as e:
    if e.name not in ("pipeline", "pipeline.pipeline_ttt_video"):
        raise
    from .ttt_video_code import install

    install()
    TTTVideoPipeline = importlib.import_module("pipeline.pipeline_ttt_video").TTTVideoPipeline
