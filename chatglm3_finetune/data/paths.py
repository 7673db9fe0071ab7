"""Paths checked before anything reads them. A device (`/dev/zero`), a named pipe or a socket
never ends or blocks when read, a broken symbolic link fails deep inside a library, and a folder
that is not a saved dataset may be huge: each is refused here, naming the path, before a byte is
hashed or parsed."""

from __future__ import annotations

import os
import stat

# state.json: a saved Dataset; dataset_dict.json: a saved DatasetDict (datasets' save_to_disk)
DATASET_FOLDER_MARKERS = ("state.json", "dataset_dict.json")
NOT_A_DATASET_FOLDER = ("not a dataset folder (a folder must be saved by datasets' save_to_disk; give a .jsonl, "
                        ".json or .parquet file otherwise)")


def file_problem(path: str, what: str = "data file") -> str | None:
    """`path: what is wrong` when `path` cannot be read as a file (`what` names it in the message):
    missing, a broken link, a folder, a device, a named pipe or a socket; None for a regular file
    or a link to one."""
    kind = _kind(path)
    if kind == "a regular file":
        return None
    if kind is None:
        return f"{path}: no such {what}"
    if kind.startswith("cannot"):
        return f"{path}: {kind}"
    return f"{path}: {kind}; the {what} must be a regular file"


def data_source_problem(path: str) -> str | None:
    """`path: what is wrong` when `path` is neither a regular data file nor a dataset folder whose
    every entry is a regular file or a folder; None when it can be read."""
    if _kind(path) != "a folder":
        return file_problem(path)
    if not any(os.path.isfile(os.path.join(path, name)) for name in DATASET_FOLDER_MARKERS):
        return f"{path}: {NOT_A_DATASET_FOLDER}"
    for root, folders, files in os.walk(path):
        for name in sorted(folders + files):
            entry = os.path.join(root, name)
            kind = _kind(entry)
            if kind not in ("a regular file", "a folder"):
                return (f"{entry}: {kind or 'gone while being checked'}, inside the dataset folder {path}, whose "
                        f"every entry must be a regular file or a folder")
    return None


def _kind(path: str) -> str | None:
    """What `path` is, following links: "a regular file", "a folder", "a broken symbolic link (...)",
    a device, a named pipe, a socket, "cannot be read (...)"; None when nothing is there."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a broken symbolic link (it points to {os.readlink(path)}, which does not exist)"
        return None
    except OSError as e:  # a link loop, a name too long, no permission to look
        return f"cannot be read ({e.strerror})"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    return "a socket"
