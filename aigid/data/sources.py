"""Where images come from: folders, single files, tar shards, zip files and list files.

``iter_items(paths)`` enumerates every image as an ``Item`` with a stable id, or an ``ItemError``
for what cannot even be enumerated; ``read_items(items)`` returns their bytes. Archives are read
as streams and never extracted: a member name is only ever part of an id string, never a
filesystem path, so ``../x.jpg`` or ``/etc/x.jpg`` inside a tar is harmless.

Ids: the absolute normalised path of a file (``os.path.abspath``: symlinks are *not* resolved, and
non-UTF-8 names keep their bytes as surrogate escapes, so ``open(item.id, "rb")`` works), and
``"<absolute archive path>::<member name>"`` for a member (a repeated member name gets ``#2``,
``#3``... in archive order). Enumeration order is deterministic (sorted folder entries), so ids
and order are the same on every run.

Lower level, for workers that own whole archives: ``iter_units`` yields files and *unexpanded*
``Archive`` units, and ``stream_archive`` enumerates and reads one archive in a single pass.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Iterator, Optional, Sequence, Union

__all__ = [
    "IMAGE_EXTENSIONS", "ARCHIVE_SUFFIXES", "LIST_SUFFIXES", "MAX_ITEM_BYTES", "Item", "ItemError",
    "Archive", "iter_items", "iter_units", "read_items", "stream_archive", "content_hash",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp",
                              ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = TAR_SUFFIXES + (".zip",)
LIST_SUFFIXES = (".txt", ".lst")
MAX_ITEM_BYTES = 512 * 2**20  # one image above this is refused rather than read into memory
LINK_MEMBER = "archive link member skipped"

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Item:
    id: str  # absolute normalised path, or "<abs archive path>::<member name>"
    source: str  # the file, or the archive holding the member
    member: Optional[str] = None  # None for plain files
    size: Optional[int] = None  # bytes, when known without reading


@dataclass(frozen=True)
class ItemError:
    """Something that could not be enumerated (missing path, unreadable archive, symlink loop)."""
    id: str
    reason: str


@dataclass(frozen=True)
class Archive:
    """An archive not yet expanded: whoever owns it streams it once with ``stream_archive``."""
    id: str  # absolute normalised path
    size: Optional[int] = None

    @property
    def kind(self) -> str:
        return "zip" if self.id.lower().endswith(".zip") else "tar"


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _suffix_in(name: str, suffixes: Collection[str]) -> bool:
    return name.lower().endswith(tuple(suffixes))


def _wanted(name: str, extensions: Optional[Collection[str]]) -> bool:
    return extensions is None or os.path.splitext(name)[1].lower() in extensions


def _as_str(path: PathLike | bytes) -> str:
    return os.fsdecode(os.fspath(path))  # bytes paths -> str with surrogate escapes


def _normalise(extensions: Optional[Collection[str]]) -> Optional[frozenset[str]]:
    if extensions is None:
        return None
    return frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


# --------------------------------------------------------------------------- enumeration


class _Walk:
    """State shared by one enumeration: which folders and explicit files were already seen.

    Folders are keyed by (st_dev, st_ino) so a symlink loop is detected and a folder reached twice
    (two overlapping arguments, a symlink to a sibling) is walked once. Files named explicitly
    (arguments, list lines) are remembered as (folder key, name) -- the directory entry, not the
    inode, so a symlink beside its target still counts as its own item -- and a walk skips them;
    files met by walking are not remembered (each folder is walked once, so they cannot repeat),
    which keeps memory bounded by the number of folders and explicit files, not of images.
    """

    def __init__(self, recursive: bool, extensions: Optional[frozenset[str]]):
        self.recursive, self.extensions = recursive, extensions
        self.dirs: set[tuple[int, int]] = set()
        self.explicit: set[tuple[int, int, str]] = set()
        self.lists: list[tuple[int, int]] = []  # list files being expanded (nesting guard)

    # A path named explicitly: a folder, an archive, a list file, or a file of any extension.
    def path(self, path: str) -> Iterator[Item | Archive | ItemError]:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            reason = "dangling symlink" if os.path.islink(path) else "path not found"
            yield ItemError(path, reason)
            return
        except OSError as err:
            yield ItemError(path, f"cannot access: {err.strerror or err}")
            return
        if stat.S_ISDIR(st.st_mode):
            yield from self.folder(path, st)
            return
        if not stat.S_ISREG(st.st_mode):
            yield ItemError(path, "not a regular file")
            return
        if _suffix_in(path, LIST_SUFFIXES):
            yield from self.list_file(path, (st.st_dev, st.st_ino))
            return
        entry = self._entry_key(path)
        if entry is not None:
            if entry in self.explicit or self._walked(path, entry):
                return  # already enumerated once in this call
            self.explicit.add(entry)
        if _suffix_in(path, ARCHIVE_SUFFIXES):
            yield Archive(path, st.st_size)
        else:
            yield Item(path, path, None, st.st_size)

    @staticmethod
    def _entry_key(path: str) -> Optional[tuple[int, int, str]]:
        try:
            parent = os.stat(os.path.dirname(path))
        except OSError:
            return None
        return parent.st_dev, parent.st_ino, os.path.basename(path)

    def _walked(self, path: str, entry: tuple[int, int, str]) -> bool:
        """Whether a walk already yielded this file (its folder was walked and it matches)."""
        if not (_suffix_in(path, ARCHIVE_SUFFIXES) or _wanted(path, self.extensions)):
            return False
        return entry[:2] in self.dirs

    def list_file(self, path: str, key: tuple[int, int]) -> Iterator[Item | Archive | ItemError]:
        if key in self.lists:
            yield ItemError(path, "list file includes itself")
            return
        base = os.path.dirname(path)
        self.lists.append(key)
        try:
            with open(path, "rb") as fh:
                for raw in fh:  # lazily: a list may hold millions of lines
                    line = os.fsdecode(raw.strip())
                    if line and not line.startswith("#"):
                        yield from self.path(os.path.abspath(os.path.join(base, line)))
        except OSError as err:
            yield ItemError(path, f"cannot read list file: {err.strerror or err}")
        finally:
            self.lists.pop()

    def folder(self, top: str, st: os.stat_result) -> Iterator[Item | Archive | ItemError]:
        key = (st.st_dev, st.st_ino)
        if key in self.dirs:
            return  # named again, or inside a folder already walked: every file counted once
        self.dirs.add(key)
        # An explicit stack instead of recursion: folder depth is unbounded.
        stack: list[tuple[str, list[tuple[int, int]], Iterator[os.DirEntry]]] = []
        entries = self._entries(top)
        if isinstance(entries, ItemError):
            yield entries
            return
        stack.append((top, [key], entries))
        while stack:
            dirpath, ancestors, it = stack[-1]
            entry = next(it, None)
            if entry is None:
                stack.pop()
                continue
            path = os.path.join(dirpath, entry.name)
            try:
                is_dir = entry.is_dir()  # follows symlinks
                is_file = not is_dir and entry.is_file()
            except OSError as err:
                yield ItemError(path, f"cannot access: {err.strerror or err}")
                continue
            if is_dir:
                if not self.recursive:
                    continue
                sub = self._subfolder(path, entry, ancestors)
                if isinstance(sub, ItemError):
                    yield sub
                elif sub is not None:
                    entries = self._entries(path)
                    if isinstance(entries, ItemError):
                        yield entries
                    else:
                        stack.append((path, ancestors + [sub], entries))
                continue
            is_archive = _suffix_in(entry.name, ARCHIVE_SUFFIXES)
            if not (is_archive or _wanted(entry.name, self.extensions)):
                continue  # captions, metadata, list files met while walking: not ours
            if not is_file:
                dangling = entry.is_symlink() and not os.path.exists(path)
                yield ItemError(path, "dangling symlink" if dangling else "not a regular file")
                continue
            try:
                fst = entry.stat()
            except OSError as err:
                yield ItemError(path, f"cannot access: {err.strerror or err}")
                continue
            if self.explicit and (*ancestors[-1], entry.name) in self.explicit:
                continue  # named explicitly earlier in this call
            yield Archive(path, fst.st_size) if is_archive else Item(path, path, None, fst.st_size)

    def _subfolder(self, path: str, entry: os.DirEntry, ancestors: list[tuple[int, int]]):
        try:
            st = entry.stat()
        except OSError as err:
            return ItemError(path, f"cannot access: {err.strerror or err}")
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            return ItemError(path, "directory symlink loop")
        if key in self.dirs:
            return ItemError(path, "directory already scanned via another path")
        self.dirs.add(key)
        return key

    @staticmethod
    def _entries(path: str) -> Iterator[os.DirEntry] | ItemError:
        try:
            with os.scandir(path) as it:
                # Real entries before symlinks, so a folder is walked under its own name rather
                # than through a sibling link to it.
                return iter(sorted(it, key=lambda e: (e.is_symlink(), e.name)))
        except OSError as err:
            return ItemError(path, f"cannot list directory: {err.strerror or err}")


def iter_units(paths: Sequence[PathLike], *, recursive: bool = True,
               extensions: Optional[Collection[str]] = IMAGE_EXTENSIONS
               ) -> Iterator[Item | Archive | ItemError]:
    """Files, unexpanded archives and enumeration errors, in a deterministic order."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]  # one path given bare: not a sequence of characters
    walk = _Walk(recursive, _normalise(extensions))
    for p in paths:
        yield from walk.path(os.path.abspath(_as_str(p)))


def iter_items(paths: Sequence[PathLike], *, recursive: bool = True,
               extensions: Optional[Collection[str]] = IMAGE_EXTENSIONS
               ) -> Iterator[Item | ItemError]:
    """Every image under ``paths`` as an ``Item``, or an ``ItemError`` with the reason.

    A path may be a folder (walked, sorted, archives inside expanded), an image file (any
    extension), a tar (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) or ``.zip``, or a
    ``.txt``/``.lst`` list of paths (one per line, relative to the list's folder; blank and ``#``
    lines ignored). ``extensions`` filters files met while walking and archive members (``None``
    keeps all). Archive members are enumerated by reading the archive's headers once.
    """
    ext = _normalise(extensions)
    for unit in iter_units(paths, recursive=recursive, extensions=extensions):
        if isinstance(unit, Archive):
            for item, _, _ in stream_archive(unit.id, extensions=ext):
                yield item
        else:
            yield unit


# --------------------------------------------------------------------------- archives

Streamed = tuple[Union[Item, ItemError], Optional[bytes], Optional[str]]


class _MemberIds:
    """``<archive>::<name>``, with ``#2``, ``#3``... for repeated names (kept per archive)."""

    def __init__(self, archive: str):
        self.archive, self.seen = archive, set()

    def __call__(self, name: str) -> str:
        ident, n = f"{self.archive}::{name}", 1
        while ident in self.seen:
            n += 1
            ident = f"{self.archive}::{name}#{n}"
        self.seen.add(ident)
        return ident


def stream_archive(archive: str, *, extensions: Optional[Collection[str]] = IMAGE_EXTENSIONS,
                   fetch: Optional[Callable[[Item], bool]] = None) -> Iterator[Streamed]:
    """Enumerate one archive in a single sequential pass, reading the members ``fetch`` wants.

    Yields ``(Item, bytes, None)`` for a member read, ``(Item, None, None)`` for one not fetched,
    ``(Item, None, reason)`` for one that could not be read, ``(ItemError, None, reason)`` for a
    link member (``"archive link member skipped"``) and, last, for an archive that cannot be
    opened or ends early (its id is the archive path). ``fetch=None`` reads nothing.
    """
    ext = _normalise(extensions)
    if archive.lower().endswith(".zip"):
        yield from _stream_zip(archive, ext, fetch)
    else:
        yield from _stream_tar(archive, ext, fetch)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _too_big(size: Optional[int]) -> Optional[str]:
    if size is not None and size > MAX_ITEM_BYTES:
        return f"too large: {size} bytes (limit {MAX_ITEM_BYTES})"
    return None


def _stream_tar(path: str, ext, fetch) -> Iterator[Streamed]:
    ids, count = _MemberIds(path), 0
    try:
        tf = tarfile.open(path, "r:*")  # seekable: members not fetched are skipped, not read
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        reason = f"unreadable archive: {_one_line(err)}"
        if "could not be opened successfully" in reason:  # tarfile lists every method it tried
            reason = "unreadable archive: not a tar file (plain, gzip, bzip2 or xz)"
        yield ItemError(path, reason), None, reason
        return
    with tf:
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError, EOFError, ValueError) as err:
                reason = f"archive unreadable after {count} members: {_one_line(err)}"
                yield ItemError(path, reason), None, reason
                return
            if info is None:
                return
            tf.members.clear()  # TarFile keeps every header otherwise: memory grows per member
            count += 1
            if not _wanted(info.name, ext):
                continue
            if info.issym() or info.islnk():
                yield ItemError(ids(info.name), LINK_MEMBER), None, LINK_MEMBER
                continue
            if not info.isfile():
                continue  # directories, devices, fifos: nothing to score
            item = Item(ids(info.name), path, info.name, info.size)
            if fetch is None or not fetch(item):
                yield item, None, None
                continue
            reason = _too_big(info.size)
            if reason:
                yield item, None, reason
                continue
            try:
                fh = tf.extractfile(info)
                data = fh.read() if fh is not None else b""
            except (tarfile.TarError, OSError, EOFError, ValueError) as err:
                yield item, None, f"cannot read member: {_one_line(err)}"
                continue  # the next header read reports whether the archive is broken
            if len(data) != info.size:
                yield item, None, f"member truncated: {len(data)} of {info.size} bytes"
                continue
            yield item, data, None


def _stream_zip(path: str, ext, fetch) -> Iterator[Streamed]:
    ids = _MemberIds(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        reason = f"unreadable archive: {_one_line(err)}"
        yield ItemError(path, reason), None, reason
        return
    with zf:
        for info in zf.infolist():
            if info.is_dir() or not _wanted(info.filename, ext):
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                yield ItemError(ids(info.filename), LINK_MEMBER), None, LINK_MEMBER
                continue
            item = Item(ids(info.filename), path, info.filename, info.file_size)
            if fetch is None or not fetch(item):
                yield item, None, None
                continue
            reason = _too_big(info.file_size)
            if reason:
                yield item, None, reason
                continue
            try:
                with zf.open(info) as fh:
                    data = fh.read()
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError,
                    ValueError) as err:  # bad CRC, encrypted, unknown compression, zlib errors
                yield item, None, f"cannot read member: {_one_line(err)}"
                continue
            yield item, data, None


# --------------------------------------------------------------------------- reading


def read_file(path: str, size: Optional[int] = None) -> tuple[Optional[bytes], Optional[str]]:
    """The bytes of one file, or the reason it cannot be read."""
    reason = _too_big(size)
    if reason:
        return None, reason
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_ITEM_BYTES + 1)
    except FileNotFoundError:
        return None, "file not found"
    except IsADirectoryError:
        return None, "is a directory"
    except OSError as err:
        return None, f"cannot read: {err.strerror or err}"
    if len(data) > MAX_ITEM_BYTES:
        return None, f"too large: more than {MAX_ITEM_BYTES} bytes"
    return data, None


def read_items(items: Iterable[Item]) -> Iterator[tuple[Item, Optional[bytes], Optional[str]]]:
    """``(item, bytes, None)`` or ``(item, None, reason)`` for each item, each exactly once.

    Consecutive members of one archive are read in a single pass over it (yielded in archive
    order, which may differ from their order here); give a worker all the members of a shard
    together and the shard is streamed once.
    """
    run: list[Item] = []
    for item in items:
        if item.member is None:
            if run:
                yield from _read_run(run)
                run = []
            data, reason = read_file(item.source, item.size)
            yield item, data, reason
        else:
            if run and run[0].source != item.source:
                yield from _read_run(run)
                run = []
            run.append(item)
    if run:
        yield from _read_run(run)


def _read_run(run: list[Item]) -> Iterator[tuple[Item, Optional[bytes], Optional[str]]]:
    wanted = {item.id: item for item in run}
    broken: Optional[str] = None
    for got, data, reason in stream_archive(run[0].source, extensions=None,
                                            fetch=lambda it: it.id in wanted):
        if isinstance(got, ItemError):
            if got.id == run[0].source:
                broken = reason  # the whole archive (or its rest) is unreadable
            elif got.id in wanted:
                yield wanted.pop(got.id), None, reason
            continue
        if got.id in wanted:
            yield wanted.pop(got.id), data, reason
    for item in wanted.values():
        yield item, None, broken or "member not found in archive"
