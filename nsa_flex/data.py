"""A byte-level training corpus that every Python installation already has: the standard library's own source.

``load_corpus()`` reads the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` /
``dist-packages`` left out, so installed packages do not change it), in sorted order of their relative paths,
and splits them by file into train and validation: a file is in validation iff
``int(sha1(relative_posix_path), 16) % 100 < val_percent``. The split depends only on the paths, so it is the
same on every machine with the same files and never mixes one file into both splits. Files are joined with a
NUL byte (which Python source never contains) as document separator; tokens are the bytes (vocabulary 256).

``corpus=PATH`` uses another directory of ``*.py`` files (same rules) or a single file of any kind, whose
last ``val_percent`` percent of bytes is the validation split.

``WindowSampler`` draws batches of random windows of ``context + 1`` bytes (inputs and shifted targets) from one
split with its own seeded ``torch.Generator``; its ``state_dict`` makes a resumed run draw the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._checks import number, positive_int, seed as check_seed

__all__ = ["Corpus", "WindowSampler", "is_validation", "list_files", "load_corpus", "stdlib_path"]

SEPARATOR = b"\x00"
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_path() -> Path:
    """The directory of the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(relative_path: str, val_percent: float = 5) -> bool:
    """Whether the file at ``relative_path`` (POSIX separators) belongs to the validation split."""
    digest = int(hashlib.sha1(relative_path.encode("utf-8")).hexdigest(), 16)
    return digest % 100 < val_percent


def list_files(root: Union[str, os.PathLike], pattern_suffix: str = ".py") -> list[str]:
    """Relative POSIX paths of the ``*.py`` files under ``root``, sorted; symlinked directories not followed."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(pattern_suffix):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


@dataclasses.dataclass
class Corpus:
    """Train and validation bytes (``uint8`` tensors) and where they came from."""

    train: Tensor
    val: Tensor
    root: str
    train_files: list[str]
    val_files: list[str]

    def describe(self) -> str:
        files = f"{len(self.train_files)}/{len(self.val_files)} files, " if self.val_files else ""
        return (f"corpus {self.root}: {files}{len(self.train) / 1e6:.2f} MB train, "
                f"{len(self.val) / 1e6:.2f} MB validation")


def _to_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def load_corpus(corpus: Optional[Union[str, os.PathLike]] = None, val_percent: float = 5,
                max_files: Optional[int] = None) -> Corpus:
    """Load the byte corpus (default: the standard library) split into train and validation.

    Args:
        corpus: a directory of ``*.py`` files, a single file, or None for :func:`stdlib_path`.
        val_percent: percent (0 < p < 100) of files (of bytes, for a single file) in validation.
        max_files: use only the first ``max_files`` files in sorted order (quick runs).

    Raises:
        ValueError: the path does not exist, holds no ``*.py`` files, or a split comes out empty.
    """
    if number("val_percent", val_percent, greater_than=0) >= 100:
        raise ValueError(f"val_percent must be a number with 0 < val_percent < 100, got {val_percent!r}")
    if max_files is not None:
        positive_int("max_files", max_files)
    root = stdlib_path() if corpus is None else Path(corpus)
    if not root.exists():
        raise ValueError(f"corpus path {str(root)!r} does not exist")
    if root.is_file():
        data = root.read_bytes()
        if not data:
            raise ValueError(f"corpus file {str(root)!r} is empty")
        cut = len(data) - max(1, int(len(data) * val_percent / 100))
        if cut < 1:
            raise ValueError(f"corpus file {str(root)!r} has {len(data)} byte(s), too few to split")
        return Corpus(_to_tensor(data[:cut]), _to_tensor(data[cut:]), str(root), [root.name], [])
    if not root.is_dir():
        raise ValueError(f"corpus path {str(root)!r} is neither a file nor a directory")
    files = list_files(root)
    if max_files is not None:
        files = files[:max_files]
    if not files:
        raise ValueError(f"corpus directory {str(root)!r} contains no *.py files")
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    for rel in files:
        try:
            text = (root / rel).read_bytes()
        except OSError:  # unreadable (permissions, a dangling link): leave it out, deterministically per machine
            continue
        if not text:
            continue
        split = is_validation(rel, val_percent)
        parts[split].append(text)
        names[split].append(rel)
    for split, label in ((False, "train"), (True, "validation")):
        if not parts[split]:
            raise ValueError(f"corpus directory {str(root)!r}: the {label} split is empty "
                             f"({len(files)} *.py file(s), val_percent={val_percent}); add files or change val_percent")
    return Corpus(_to_tensor(SEPARATOR.join(parts[False])), _to_tensor(SEPARATOR.join(parts[True])), str(root),
                  names[False], names[True])


class WindowSampler:
    """Random windows of ``context + 1`` tokens from ``data``: ``next()`` -> ``LongTensor [batch, context + 1]``.

    Windows start uniformly in ``[0, len(data) - context - 1]``, drawn with a ``torch.Generator`` seeded with
    ``seed``; ``state_dict()`` / ``load_state_dict()`` save and restore the generator, so the batches after a
    restore are the ones an uninterrupted sampler would have drawn.
    """

    def __init__(self, data: Tensor, context: int, batch: int, seed: int = 0):
        if not isinstance(data, Tensor) or data.ndim != 1:
            raise ValueError(f"data must be a 1-D tensor of tokens, got {type(data).__name__}"
                             f"{' of shape ' + str(list(data.shape)) if isinstance(data, Tensor) else ''}")
        positive_int("context", context)
        positive_int("batch", batch)
        check_seed("seed", seed)
        if len(data) < context + 1:
            raise ValueError(f"data has {len(data)} tokens, fewer than context + 1 = {context + 1}")
        self.data, self.context, self.batch, self.seed = data, context, batch, seed
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(context + 1)

    def __iter__(self) -> "WindowSampler":
        return self

    def __next__(self) -> Tensor:
        starts = torch.randint(0, len(self.data) - self.context, (self.batch,), generator=self.generator)
        return self.data[starts[:, None] + self._offsets].long()

    next = __next__

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "seed": self.seed, "context": self.context,
                "batch": self.batch, "num_tokens": len(self.data)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("context", "batch", "num_tokens"):
            mine = len(self.data) if key == "num_tokens" else getattr(self, key)
            if state.get(key, mine) != mine:
                raise ValueError(f"sampler state is for {key}={state[key]}, this sampler has {key}={mine}")
        self.generator.set_state(state["generator"])
