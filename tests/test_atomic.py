"""pipeline/atomic.py: folders and files are replaced whole or not at all."""

from __future__ import annotations

import pytest

from pipeline.atomic import (
    atomic_path,
    atomic_write_text,
    build_dir_atomically,
    copy_dir_atomically,
    save_pretrained_atomically,
)


class _Saver:
    def __init__(self, files: dict[str, str], fail_after: int | None = None):
        self.files, self.fail_after = files, fail_after

    def save_pretrained(self, folder):
        for i, (name, text) in enumerate(self.files.items()):
            if i == self.fail_after:
                raise OSError("disk full")
            (folder / name).write_text(text)


def _tree(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_save_replaces_the_whole_folder_and_a_failed_save_leaves_the_old_one(tmp_path):
    out = tmp_path / "model"
    save_pretrained_atomically(_Saver({"a.json": "1", "b.bin": "2"}), out)
    assert _tree(out) == {"a.json": "1", "b.bin": "2"}
    save_pretrained_atomically(_Saver({"a.json": "3"}), out)
    assert _tree(out) == {"a.json": "3"}  # nothing of the old folder is left over
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomically(_Saver({"a.json": "4", "b.bin": "5"}, fail_after=1), out)
    assert _tree(out) == {"a.json": "3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders behind


def test_a_saved_model_folder_is_readable_by_all(tmp_path):
    """diffusers' save_pretrained writes its weights through safetensors, which (0.8) makes them 0o600 whatever the
    umask; the folder that replaces `out` has ordinary modes, so another user can load the model."""
    from tiny import tiny_vae

    out = save_pretrained_atomically(tiny_vae(), tmp_path / "vae")
    readable = {p.name: p.stat().st_mode & 0o444 == 0o444 for p in out.iterdir()}  # whatever the umask adds
    assert readable == {"config.json": True, "diffusion_pytorch_model.safetensors": True}
    src = tmp_path / "private"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"w")
    (src / "sub" / "w.bin").chmod(0o600)
    (src / "sub").chmod(0o700)
    copy = copy_dir_atomically(src, tmp_path / "copy")
    assert oct((copy / "sub").stat().st_mode & 0o777) == "0o755"
    assert oct((copy / "sub" / "w.bin").stat().st_mode & 0o777) == "0o644"
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    (outside / "secret").write_bytes(b"s")
    (outside / "secret").chmod(0o600)
    linked = build_dir_atomically(tmp_path / "linked", lambda tmp: ((tmp / "d").symlink_to(outside),
                                                                     (tmp / "f").symlink_to(outside / "secret")))
    assert (linked / "f").read_bytes() == b"s"
    assert oct(outside.stat().st_mode & 0o777) == "0o700"  # a link's target outside the folder keeps its mode
    assert oct((outside / "secret").stat().st_mode & 0o777) == "0o600"


def test_copy_and_text_write(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.txt").write_text("x")
    out = copy_dir_atomically(src, tmp_path / "deep" / "copy")
    assert _tree(out) == {"x.txt": "x"} and oct(out.stat().st_mode & 0o777) == "0o755"
    path = atomic_write_text(tmp_path / "t" / "note.txt", "hello\n")
    assert path.read_text() == "hello\n" and oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in path.parent.iterdir()] == ["note.txt"]


def test_atomic_path_renames_on_success_and_removes_on_failure(tmp_path):
    out = tmp_path / "sub" / "video.mp4"
    with atomic_path(out, suffix=".mp4.tmp") as tmp:
        assert tmp.parent == out.parent and tmp.name.endswith(".mp4.tmp") and not out.exists()
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and oct(out.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(RuntimeError, match="encoder died"):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("encoder died")
    assert out.read_bytes() == b"new"  # the old file is kept
    assert [p.name for p in out.parent.iterdir()] == ["video.mp4"]  # and no temporary is left
