"""Saved weights get the permissions the user's umask gives every other file: safetensors writes
its files 0600 (readable by their owner only), which breaks sharing a checkpoint with a serving
account or a group."""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(folder: str) -> None:
    """Gives the .safetensors files in `folder` the mode a newly created file gets (0644 under umask 022)."""
    mode = 0o666 & ~current_umask()
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            os.chmod(os.path.join(folder, name), mode)
