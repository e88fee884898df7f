"""minilora.files: atomic writes are durable (fsync before the rename that publishes them), keep the user's umask,
and OS errors (read-only or full disk) name the path."""

import errno
import os
import stat
import tempfile

import pytest
import torch

from minilora import files
from minilora.errors import MiniloraError, run_cli


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_open_would_give(tmp_path, umask):
    """mkstemp creates 0600 files; an adapter or merged model must be readable as open() would have made it."""
    old = os.umask(umask)
    try:
        files.write_json(tmp_path / "adapter_config.json", {"r": 8})
        files.save_safetensors(tmp_path / "adapter_model.safetensors", {"w": torch.zeros(2)})
        with open(tmp_path / "reference", "w"):  # the oracle: what a plain open() makes under this umask
            pass
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to name file descriptors")
    files.write_text(tmp_path / "latest", "step-000002\n")
    (kind1, synced), (kind2, tmp, target), (kind3, folder) = events
    assert (kind1, kind2, kind3) == ("fsync", "replace", "fsync")
    assert synced == tmp and target == str(tmp_path / "latest") and folder == str(tmp_path)
    assert (tmp_path / "latest").read_text() == "step-000002\n"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    files.write_text(tmp_path / "config.toml", "old\n")

    def full(path, text, encoding=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(type(tmp_path), "write_text", full)
    with pytest.raises(OSError):
        files.write_text(tmp_path / "config.toml", "new\n")
    monkeypatch.undo()
    assert (tmp_path / "config.toml").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def _simulate_read_only(monkeypatch, folder):
    """root ignores permissions, so a read-only folder is simulated where it cannot be made (EROFS from mkstemp)."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(folder)):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("how", ["chmod", "simulated"])
def test_unwritable_output_folder_is_named_at_start_up(tmp_path, monkeypatch, how):
    folder = tmp_path / "runs"
    folder.mkdir()
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        folder.chmod(0o555)
    else:
        _simulate_read_only(monkeypatch, folder)
    try:
        with pytest.raises(MiniloraError) as e:
            files.ensure_writable_dir(folder / "a", "output folder (--output)")
    finally:
        folder.chmod(0o755)
    assert str(e.value).startswith(f"cannot write the output folder (--output) {folder}")
    assert "(write somewhere you have permission to" in str(e.value)


def test_os_error_message_names_path_and_remedy():
    assert files.os_error_message(OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.jsonl")) == \
        "/runs/a/metrics.jsonl: No space left on device (free some space)"


def test_cli_prints_an_os_error_as_one_line(capsys):
    def main(argv):
        raise PermissionError(errno.EACCES, "Permission denied", "/models/x/config.json")

    assert run_cli(main, []) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: /models/x/config.json: Permission denied (check the path")
