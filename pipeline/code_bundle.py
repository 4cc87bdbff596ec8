"""What a saved pipeline folder carries for `DiffusionPipeline.from_pretrained`: the pipeline file named in
model_index.json (`CODE_FILE`), and the sampling path's code, so that
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works in a process that cannot import this
repository (docs/sampling.md, "Loading").

diffusers' remote-code loader copies the folder's pipeline file (pipeline_ttt_video.py) into its modules cache and
runs it there, together with the single files that one imports relatively (`from .name import ...`), but no package
and nothing those files import in turn. The code this pipeline needs is three packages (pipeline, models, kernels)
with absolute imports, so it travels as ONE such file, `BUNDLE_FILE`: a zip of their sources, which `install()`
unpacks next to the file's copy in the modules cache (a folder named by the zip's hash) and puts on sys.path. The
folder's pipeline file imports the repository's own code when it can, and the bundle only when it cannot.
"""

from __future__ import annotations

import base64
import io
import os
import zipfile
from pathlib import Path

# model_index.json names the pipeline class as [module file in the folder, class]: diffusers' remote-code form, which
# DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) resolves by running that file (docs/sampling.md)
CODE_FILE = "pipeline_ttt_video.py"
CLASS_NAME_ENTRY = [CODE_FILE.removesuffix(".py"), "TTTVideoPipeline"]
CODE_FILE_TEXT = '''"""TTT-Video's pipeline, for `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

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
'''
# The same file for a folder that lives inside this repository (models/default): the repository's code only, so the
# folder needs no bundle (a zip of the code beside it, which would only lag it in git)
REPO_CODE_FILE_TEXT = '''"""TTT-Video's pipeline, for `DiffusionPipeline.from_pretrained(folder, ...)`.

This folder lives in the TTT-Video repository and uses its code (pipeline, models, kernels), which must be
importable; `TTTVideoPipeline.save_pretrained` writes a copy that also carries the code, for use elsewhere.
"""

import importlib

TTTVideoPipeline = importlib.import_module("pipeline.pipeline_ttt_video").TTTVideoPipeline
'''
BUNDLE_FILE = "ttt_video_code.py"
PACKAGES = ("pipeline", "models", "kernels")
ROOT = Path(__file__).resolve().parents[1]

_INSTALL = '''
def install() -> str:
    """Unpacks the code (once per content) next to this file and puts it first on sys.path; returns the folder."""
    import hashlib
    import os
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    data = base64.b64decode(_ZIP)
    target = Path(__file__).resolve().parent / f"ttt_video_code_{hashlib.sha256(data).hexdigest()[:16]}"
    if not target.is_dir():
        tmp = tempfile.mkdtemp(dir=target.parent, prefix=".ttt_video_code.")
        zipfile.ZipFile(io.BytesIO(data)).extractall(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    return str(target)
'''


def source_files(root: Path = ROOT) -> list[Path]:
    """The sampling path's sources: pipeline/*.py (not its sub-packages: training, data, demo, toy, toyworld),
    models/**/*.py and kernels/**/*.py, relative to root."""
    files = sorted((root / "pipeline").glob("*.py"))
    for package in PACKAGES[1:]:
        files += sorted((root / package).rglob("*.py"))
    return [f.relative_to(root) for f in files if "__pycache__" not in f.parts]


def bundle_text(root: Path = ROOT) -> str:
    """The text of BUNDLE_FILE: the sources as a deterministic zip (fixed timestamps, sorted), base64, and install()."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in source_files(root):
            info = zipfile.ZipInfo(path.as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, (root / path).read_bytes())
    encoded = base64.encodebytes(buffer.getvalue()).decode()
    return ('"""TTT-Video\'s sampling code (packages pipeline, models, kernels) as of the export that wrote this file; '
            'see\nthe repository\'s pipeline/code_bundle.py. Written by TTTVideoPipeline.save_pretrained."""\n\n'
            "import base64\nimport io\nimport zipfile\n\n"
            f'_ZIP = """\n{encoded}"""\n\n{_INSTALL}')


def use_repository_code(folder: str | os.PathLike) -> None:
    """Turns a saved pipeline folder into the in-repository form: the pipeline file that imports the repository's
    code, and no code bundle (for the bundled default model, `python -m pipeline.toy.model install`)."""
    folder = Path(folder)
    (folder / CODE_FILE).write_text(REPO_CODE_FILE_TEXT, encoding="utf-8")
    (folder / BUNDLE_FILE).unlink(missing_ok=True)
