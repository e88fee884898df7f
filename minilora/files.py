"""Files on disk: atomic writes, JSON objects read with clear errors, a model folder's companion files.

Atomic writes: write to a temporary file beside the target, then rename it into place.

Why: a checkpoint or adapter half-written when the process is killed (Ctrl-C, out of memory, power) would
silently corrupt a run. `os.replace` is atomic on POSIX and Windows when source and target are on the same
file system, so readers see either the old file or the complete new one, never a torn write.
"""

import contextlib
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
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
