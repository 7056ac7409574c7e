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
``Archive`` units, and ``stream_archive`` enumerates and reads one archive in a single pass. Both
take ``on_skip``, called with the name of each file left out by the extension filter, so a caller
can count what was not scanned without a second walk. ``image_format`` names an image format from
its first bytes (for scanning by content instead of by name).
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
    "image_format", "skip_key", "SNIFF_BYTES",
]

# AVIF is decoded by Pillow itself; HEIF/HEIC and JPEG XL need the [formats] extra, and without it
# they are error rows that say so (aigid.data.images), not silently skipped files.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp",
                              ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm",
                              ".avif", ".heic", ".heif", ".jxl"})
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


SNIFF_BYTES = 128  # enough for every signature below, an ISO-BMFF ftyp box's brand list included
# ISO-BMFF brands (ftyp major or compatible): AVIF (AV1 in HEIF) is checked first, since an AVIF
# file often has the generic HEIF brand "mif1" as its major brand.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs",
                          b"mif1", b"mif2", b"msf1"})
_BMP_HEADERS = frozenset({12, 40, 52, 56, 64, 108, 124})  # BITMAPCOREHEADER ... BITMAPV5HEADER


def _ftyp_brands(head: bytes) -> list[bytes]:
    if len(head) < 16 or head[4:8] != b"ftyp":
        return []
    size = int.from_bytes(head[:4], "big")
    end = min(size, len(head)) if size >= 16 else 16
    return [head[8:12]] + [head[i:i + 4] for i in range(16, end - 3, 4)]


def image_format(head: bytes) -> Optional[str]:
    """The image format named by a file's first bytes (``SNIFF_BYTES`` suffice): ``"jpeg"``,
    ``"png"``, ``"gif"``, ``"webp"``, ``"bmp"``, ``"tiff"``, ``"avif"``, ``"heif"``, ``"jxl"``;
    ``None`` for anything else (text, JSON, archives, unknown formats)."""
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADERS:
        return "bmp"  # "BM" alone would also match text starting with those letters
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:2] == b"\xff\x0a" or head[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "jxl"  # bare codestream, or the ISO-BMFF container
    brands = _ftyp_brands(head)
    if any(b in _AVIF_BRANDS for b in brands):
        return "avif"
    if any(b in _HEIF_BRANDS for b in brands):
        return "heif"
    return None


def skip_key(name: str) -> str:
    """How a file left out as not an image is counted: its lower-case extension, or ``"(none)"``."""
    return os.path.splitext(name)[1].lower() or "(none)"


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

    def __init__(self, recursive: bool, extensions: Optional[frozenset[str]],
                 on_skip: Optional[Callable[[str], None]] = None):
        self.recursive, self.extensions, self.on_skip = recursive, extensions, on_skip
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
                if is_file and self.on_skip is not None:
                    self.on_skip(path)
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
               extensions: Optional[Collection[str]] = IMAGE_EXTENSIONS,
               on_skip: Optional[Callable[[str], None]] = None
               ) -> Iterator[Item | Archive | ItemError]:
    """Files, unexpanded archives and enumeration errors, in a deterministic order.
    ``on_skip(path)`` is called for each regular file a walk leaves out by its extension."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]  # one path given bare: not a sequence of characters
    walk = _Walk(recursive, _normalise(extensions), on_skip)
    for p in paths:
        yield from walk.path(os.path.abspath(_as_str(p)))


def iter_items(paths: Sequence[PathLike], *, recursive: bool = True,
               extensions: Optional[Collection[str]] = IMAGE_EXTENSIONS,
               on_skip: Optional[Callable[[str], None]] = None) -> Iterator[Item | ItemError]:
    """Every image under ``paths`` as an ``Item``, or an ``ItemError`` with the reason.

    A path may be a folder (walked, sorted, archives inside expanded), an image file (any
    extension), a tar (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) or ``.zip``, or a
    ``.txt``/``.lst`` list of paths (one per line, relative to the list's folder; blank and ``#``
    lines ignored). ``extensions`` filters files met while walking and archive members (``None``
    keeps all). Archive members are enumerated by reading the archive's headers once.
    ``on_skip(name)`` is called for each file or member the filter leaves out.
    """
    ext = _normalise(extensions)
    for unit in iter_units(paths, recursive=recursive, extensions=extensions, on_skip=on_skip):
        if isinstance(unit, Archive):
            for item, _, _ in stream_archive(unit.id, extensions=ext, on_skip=on_skip):
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
                   fetch: Optional[Callable[[Item], bool]] = None,
                   on_skip: Optional[Callable[[str], None]] = None) -> Iterator[Streamed]:
    """Enumerate one archive in a single sequential pass, reading the members ``fetch`` wants.

    Yields ``(Item, bytes, None)`` for a member read, ``(Item, None, None)`` for one not fetched,
    ``(Item, None, reason)`` for one that could not be read, ``(ItemError, None, reason)`` for a
    link member (``"archive link member skipped"``) and, last, for an archive that cannot be
    opened or ends early (its id is the archive path). ``fetch=None`` reads nothing.
    ``on_skip(member name)`` is called for each regular member left out by its extension.
    """
    ext = _normalise(extensions)
    if archive.lower().endswith(".zip"):
        yield from _stream_zip(archive, ext, fetch, on_skip)
    else:
        yield from _stream_tar(archive, ext, fetch, on_skip)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _too_big(size: Optional[int]) -> Optional[str]:
    if size is not None and size > MAX_ITEM_BYTES:
        return f"too large: {size} bytes (limit {MAX_ITEM_BYTES})"
    return None


def _stream_tar(path: str, ext, fetch, on_skip=None) -> Iterator[Streamed]:
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
                if on_skip is not None and info.isfile():
                    on_skip(info.name)
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


def _stream_zip(path: str, ext, fetch, on_skip=None) -> Iterator[Streamed]:
    ids = _MemberIds(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        reason = f"unreadable archive: {_one_line(err)}"
        yield ItemError(path, reason), None, reason
        return
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            if not _wanted(info.filename, ext):
                if on_skip is not None:
                    on_skip(info.filename)
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
            # Ask for what the file holds (+1 notices growth), not MAX_ITEM_BYTES: Python allocates
            # the requested size up front (~110 µs per image for 512 MiB).
            want = min(os.fstat(fh.fileno()).st_size, MAX_ITEM_BYTES) + 1
            data = fh.read(want)
            if len(data) == want and want <= MAX_ITEM_BYTES:  # it grew since the stat
                data += fh.read(MAX_ITEM_BYTES + 1 - len(data))
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
