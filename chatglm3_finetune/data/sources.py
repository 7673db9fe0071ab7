"""Where records come from: `.json`/`.jsonl` files, `.parquet` files and local folders saved with
`datasets` (`save_to_disk`), each record paired with its location for error messages
(`file:LINE`, `file[INDEX]`, `folder/split[ROW]`)."""

from __future__ import annotations

import math
import os

from .paths import NOT_A_DATASET_FOLDER, data_source_problem
from .records import DataError, read_records
from .strict_json import field_path


def read_source(path: str, split: str | None = None, split_flag: str = "--split") -> list[tuple[str, object]]:
    """(location, record) pairs of a data file or dataset folder; `split` picks one split of a
    folder saved as a DatasetDict (`split_flag` is the option that sets it, for the messages).
    The path is checked first (paths.data_source_problem): nothing else is read before."""
    problem = data_source_problem(path)
    if problem:
        raise DataError(problem)
    if os.path.isdir(path):
        return _read_dataset_folder(path, split, split_flag)
    if split is not None:
        raise DataError(f"{path}: {split_flag} {split} chooses a split, but only a dataset folder saved as a "
                        f"DatasetDict has splits; leave {split_flag} out")
    if path.endswith(".parquet"):
        return _read_parquet(path)
    return read_records(path)


def _read_parquet(path: str) -> list[tuple[str, object]]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    return _located_rows(path, rows)


def _read_dataset_folder(path: str, split: str | None, split_flag: str) -> list[tuple[str, object]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise DataError(f"{path}: {NOT_A_DATASET_FOLDER}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = ", ".join(loaded)
        if split is None and len(loaded) > 1:
            raise DataError(f"{path}: the dataset has the splits {names}: choose one with {split_flag}")
        split = split if split is not None else next(iter(loaded))
        if split not in loaded:
            raise DataError(f"{path}: {split_flag} {split}: no such split (the dataset has {names})")
        return _located_rows(os.path.join(path, split), loaded[split].to_list())
    if split is not None:
        raise DataError(f"{path}: {split_flag} {split}: this dataset folder holds one Dataset, not splits; "
                        f"leave {split_flag} out")
    return _located_rows(path, loaded.to_list())


def _located_rows(where: str, rows: list[dict]) -> list[tuple[str, object]]:
    if not rows:
        raise DataError(f"{where}: the data holds no records")
    located = [(f"{where}[{i}]", from_columns(row)) for i, row in enumerate(rows)]
    for place, record in located:
        field = _non_finite_field(record, ())
        if field is not None:
            raise DataError(f"{place}: {field_path(field)}: the value is not a finite number (NaN or infinity); "
                            f"replace it with a number or null")
    return located


def _non_finite_field(value, location: tuple) -> tuple | None:
    """The path to the first NaN or infinite float (columnar files hold them as plain floats)."""
    if isinstance(value, float) and not math.isfinite(value):
        return location
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite_field(item, (*location, key))
        if found is not None:
            return found
    return None


def from_columns(value):
    """A row of a columnar file as a JSON record: null object fields left out, at every depth, and
    values JSON has no type for (timestamps, bytes, ...) as text.

    A columnar file gives every row every field its column type has (a user message gets
    `tool_calls: null`, a tool call's parameters get the keys of every other call's), so a
    null field there means "absent", and is read as such.
    """
    if isinstance(value, dict):
        return {key: from_columns(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [from_columns(item) for item in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
