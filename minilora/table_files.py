"""Tabular data files as records: CSV and TSV (the standard library's csv), Parquet, Arrow and
`datasets.save_to_disk` folders (pyarrow: the optional `pyarrow` extra).

Every row becomes a dict {column: value} with its location for error messages ("file:line" for a CSV row,
"file row N" for Parquet/Arrow, N counted from 0 as in `dataset[N]`): the same (location, record) pairs that
data.read_records gives for JSONL, so base mode's text column and SFT's format detection (alpaca, messages,
ShareGPT) read a table exactly as they read a .jsonl file.

    .csv .tsv          first row = the column names; every value is a string (an empty cell is "")
    .parquet           pyarrow.parquet; nested columns (a list of {role, content} turns) come back as lists of dicts
    .arrow .feather    Arrow IPC, file or stream format (datasets writes the stream format)
    folder             what `datasets.Dataset.save_to_disk` writes: data-*.arrow shards (in the order state.json
                       lists them), dataset_info.json, state.json. A DatasetDict folder (dataset_dict.json) holds
                       one folder per split: point at one of them (e.g. DIR/train).

CSV has no nested values, so conversations in the messages/ShareGPT formats need JSONL, Parquet or Arrow; alpaca
columns (instruction, input, output) work in a CSV.

Deliberately not handled: streaming (the whole table is read into memory), compressed CSV, `load_dataset` scripts.
"""

import csv
from pathlib import Path

from .errors import MiniloraError
from .files import read_json_object

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".arrow", ".feather")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset, or a DatasetDict of them)."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json",
                                                                      "dataset_info.json"))


def is_table(path: Path) -> bool:
    return path.suffix.lower() in TABLE_SUFFIXES or is_saved_dataset(path)


def read_table(path: Path, skipped: list | None = None) -> list[tuple[str, dict]]:
    """The rows of a table file or save_to_disk folder as (location, record) pairs.

    A CSV row whose cell count differs from the header's raises MiniloraError, or, with a `skipped` list, is
    noted there and left out."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        return _read_csv(path, "\t" if path.suffix.lower() == ".tsv" else ",", skipped)
    return [(f"{path} row {i}", row) for i, row in enumerate(_read_arrow_table(path).to_pylist())]


def _read_csv(path: Path, delimiter: str, skipped: list | None) -> list[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a leading BOM is not a column name
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if not header:
                raise MiniloraError(f"{path} is empty: a {path.suffix} file needs a header row of column names")
            rows = []
            for cells in reader:
                where = f"{path}:{reader.line_num}"
                if not cells:
                    continue  # a blank line
                if len(cells) != len(header):
                    problem = (f"{where}: {len(cells)} cells, but the header has {len(header)} columns "
                               f"({', '.join(header)}); check the quoting")
                    if skipped is None:
                        raise MiniloraError(problem)
                    skipped.append(problem)
                    continue
                rows.append((where, dict(zip(header, cells))))
            return rows
    except UnicodeDecodeError as e:
        raise MiniloraError(f"{path} is not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise MiniloraError(f"{path}: not valid {path.suffix[1:].upper()} ({e})") from None


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise MiniloraError(f"reading {path} needs pyarrow (Parquet/Arrow): pip install 'minilora[pyarrow]' "
                            "(or pip install pyarrow), or convert the data to .jsonl/.csv") from None
    return pyarrow


def _read_arrow_table(path: Path):
    pa = _pyarrow(path)
    if path.is_dir():
        return pa.concat_tables([_read_arrow_file(pa, f) for f in _dataset_files(path)])
    try:
        if path.suffix.lower() == ".parquet":
            return pa.parquet.read_table(path)
        return _read_arrow_file(pa, path)
    except (pa.ArrowInvalid, OSError) as e:
        raise MiniloraError(f"{path}: cannot read it as {path.suffix[1:]} ({e})") from None


def _read_arrow_file(pa, path: Path):
    """An Arrow IPC file (random-access format, .arrow/.feather) or stream (what datasets writes)."""
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()


def _dataset_files(folder: Path) -> list[Path]:
    """The data-*.arrow shards of a save_to_disk folder, in the order state.json lists them."""
    if (folder / "dataset_dict.json").is_file():
        splits = read_json_object(folder / "dataset_dict.json").get("splits", [])
        raise MiniloraError(f"{folder} holds a DatasetDict with splits {', '.join(map(str, splits)) or '(none)'}: "
                            f"give one split, e.g. --data {folder / str(splits[0] if splits else 'train')}")
    state = folder / "state.json"
    if state.is_file():
        names = [entry["filename"] for entry in read_json_object(state).get("_data_files", [])]
    else:
        names = sorted(p.name for p in folder.glob("data-*.arrow"))
    shards = [folder / name for name in names]
    missing = [p.name for p in shards if not p.is_file()]
    if not shards or missing:
        raise MiniloraError(f"{folder}: a save_to_disk folder needs its data-*.arrow files "
                            f"({'missing: ' + ', '.join(missing) if missing else 'none found'})")
    return shards
