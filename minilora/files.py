"""Files on disk: atomic writes, JSON objects read with clear errors, a model folder's companion files.

Atomic writes: write to a temporary file beside the target, fsync it, then rename it into place.

Why: a checkpoint or adapter half-written when the process is killed (Ctrl-C, out of memory, power) would
silently corrupt a run. `os.replace` is atomic on POSIX and Windows when source and target are on the same
file system, so readers see either the old file or the complete new one, never a torn write. The rename only
survives a power cut if the data reached the disk first: the file is fsynced before the rename, and the folder
after it (the rename is an entry in the folder). `mkstemp` creates its file with mode 0600, so the published
file is given the mode `open()` would have given it, 0666 minus the user's umask: an adapter or merged model
must stay readable by a serving container or another user, as transformers' own files are.
"""

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import MiniloraError

# Files that hold a model's weights (or their index): written by the format's saver, never copied beside them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
NOT_COPIED = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        fsync(tmp)  # before the chmod: a umask of 0777 gives a mode no one may open
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def default_file_mode() -> int:
    """The mode `open()` gives a new file: 0666 minus the process's umask (read at each write, as it may change).

    Linux reports the umask in /proc/self/status; elsewhere it can only be read by setting it (os.umask), which
    for an instant changes it for every thread of the process."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to the disk. Folders cannot be opened on Windows: skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return  # Windows: a folder cannot be opened; its renames are durable there anyway
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems that cannot sync a folder
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file in `folder` (and its sub-folders), then the folders themselves."""
    for root, _, names in os.walk(folder):
        for name in names:
            fsync(Path(root) / name)
        fsync(root)


def os_error_message(e: OSError) -> str:
    """An OSError as "path: reason" ("/runs/a: Read-only file system"), the way a person reads it."""
    where = e.filename if e.filename is not None else "(unknown path)"
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free some space)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason += " (write somewhere you have permission to, e.g. another --output)"
    return f"{where}: {reason}"


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` if needed and check a file can be written in it, so that a read-only or full disk is
    reported at start-up (naming the folder) instead of as a traceback at the first checkpoint."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".minilora-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MiniloraError(f"cannot write the {what} {os_error_message(e)}; nothing in it was changed") from None
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write a JSON file, indented for people to read."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Atomically write a .safetensors file (tensors are made contiguous first, as safetensors requires)."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_json_object(path: str | os.PathLike, hint: str = "") -> dict:
    """Read a file that must hold one JSON object; a corrupt or wrong-shaped file is a MiniloraError naming it
    (`hint` says what to do about it)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MiniloraError(f"{path} is not valid JSON ({e}){'; ' + hint if hint else ''}") from None
    if not isinstance(value, dict):
        raise MiniloraError(f"{path} should hold a JSON object, found {type(value).__name__}")
    return value


def copy_companion_files(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy every file of `model_dir` that is not weights (tokenizer.json, tokenizer_config.json,
    generation_config.json, chat_template.jinja, ...) into `out_dir`, each atomically, so that the saved weights
    form a complete model folder. Returns the names copied."""
    copied = []
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file() and f.name not in NOT_COPIED and not f.name.endswith(WEIGHT_SUFFIXES):
            with atomic_path(Path(out_dir) / f.name) as tmp:
                shutil.copyfile(f, tmp)
            copied.append(f.name)
    return copied
