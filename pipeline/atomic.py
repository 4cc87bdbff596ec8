"""Writing files and folders so that nothing is ever half-written: everything goes to a temporary name in the same
folder first and is then renamed into place (a rename within one file system is atomic)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path in `path`'s folder for a writer that needs a file name (a video muxer, save_file,
    savefig): renamed over `path` (as an ordinary 0o644 file) when the block ends, removed if it raises.
    `suffix` ends the temporary name, for writers that read the format from it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file it replaces was an ordinary one
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file under a temporary name in the same folder, then rename it over `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_pretrained_atomically(obj, out: str | os.PathLike) -> Path:
    """obj.save_pretrained (a diffusers pipeline or model) into a temporary sibling folder, then swapped in for
    `out`: a reader sees the old folder or the new one, never a mix or a half-written one."""
    return build_dir_atomically(out, obj.save_pretrained)


def copy_dir_atomically(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A copy of the folder `src` swapped in for `out` (see save_pretrained_atomically)."""
    return build_dir_atomically(out, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


def build_dir_atomically(out: str | os.PathLike, fill) -> Path:
    """fill(tmp) writes the new folder into a temporary sibling of `out`, which then replaces `out`; on failure the
    temporary folder is removed and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _replace_dir(tmp, out)


def _replace_dir(tmp: Path, out: Path) -> Path:
    """Put the finished folder `tmp` (a sibling of `out`) in place of `out`, removing the old one after the swap."""
    _make_readable(tmp)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)
    return out


def _make_readable(folder: Path) -> None:
    """Give a new folder the modes of ordinary ones: folders 0o755, files readable by all (their other bits kept).
    mkdtemp makes the folder private, and safetensors (0.8) writes every file 0o600 whatever the umask, which would
    leave an exported model readable only by the user who trained it."""
    os.chmod(folder, 0o755)
    for root, dirs, files in os.walk(folder):  # a link is left alone: what it points to may lie outside the folder
        for name in dirs:
            if not os.path.islink(path := os.path.join(root, name)):
                os.chmod(path, 0o755)
        for name in files:
            if not os.path.islink(path := os.path.join(root, name)):
                os.chmod(path, os.stat(path).st_mode & 0o7777 | 0o644)
