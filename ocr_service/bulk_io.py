"""What the bulk command reads and writes, without the model: the documents of an input (a folder, a glob,
a list of paths, an fsspec URL), their bytes and content hash, and the output folder with its manifest.

The output folder holds one folder per document (named by the document's path below the input's root) and
`manifest.jsonl`, one line per finished document, appended and synced. A document's folder is built in
`.bulk-staging/` and moved into place with one rename; its manifest line, written after, is what makes it
done. A kill at any moment therefore leaves every visible file whole: a folder without its line is redone
by the next run, and what was staged is deleted when the next run starts.
"""

import contextlib
import datetime
import glob
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

# What a folder or a bucket prefix is searched for (the type itself still comes from the content). A glob
# or a list takes every file it names.
DOCUMENT_EXTENSIONS = (".pdf", ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".gif", ".tif", ".tiff", ".bmp",
                       ".jp2", ".j2k", ".jpx", ".ico", ".psd")
LIST_EXTENSIONS = (".txt", ".lst", ".list")  # an input file with one of these lists the documents
GLOB_CHARACTERS = re.compile(r"[*?\[]")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
CHUNK = 1 << 20

MANIFEST = "manifest.jsonl"
STAGING = ".bulk-staging"
LOG = "bulk.log"
DOCUMENT_JSON = "output.json"
DOCUMENT_MARKDOWN = "output.md"
RESERVED = (MANIFEST, STAGING, LOG)

OK, REFUSED, FAILED = "ok", "refused", "failed"  # refused: the document itself (damaged, over a limit)
FINAL = (OK, REFUSED)  # a rerun skips these (same content, same options); FAILED is tried again


class BulkError(RuntimeError):
    """The command cannot run as asked (bad input location, unusable output folder, Ray missing)."""


@dataclass(frozen=True)
class Source:
    location: str  # a local path or an fsspec URL
    name: str  # its path below the input's root, '/'-separated: its folder in the output, its manifest key


def is_url(text: str) -> bool:
    return URL.match(text) is not None


# ---------------------------------------------------------------- listing


def list_sources(spec: str, exclude: Optional[Path] = None) -> list:
    """The documents of INPUT, in a stable order; `exclude` (the output folder) is never listed."""
    if is_url(spec):
        return _remote_sources(spec)
    path = Path(spec)
    if GLOB_CHARACTERS.search(spec) and not path.exists():
        root = _glob_root(spec)
        matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        return [Source(p, Path(p).relative_to(root).as_posix()) for p in matches]
    if path.is_dir():
        return _folder_sources(path, exclude)
    if path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
        return _listed_sources(path.read_text(encoding="utf-8").splitlines(), path.parent)
    if path.is_file():
        return [Source(str(path), path.name)]
    raise BulkError(f"{spec}: no such file, folder, glob or list of documents")


def _glob_root(pattern: str) -> str:
    """The folder above a glob's first wildcard."""
    parts = pattern.split("/")
    fixed = []
    for part in parts[:-1]:
        if GLOB_CHARACTERS.search(part):
            break
        fixed.append(part)
    return "/".join(fixed) or ("/" if pattern.startswith("/") else ".")


def _wanted(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in DOCUMENT_EXTENSIONS


def _folder_sources(root: Path, exclude: Optional[Path]) -> list:
    excluded = exclude.resolve() if exclude is not None else None
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")
                               and (excluded is None or Path(folder, d).resolve() != excluded))
        for name in sorted(files):
            if _wanted(name):
                path = Path(folder, name)
                found.append(Source(str(path), path.relative_to(root).as_posix()))
    return found


def _listed_sources(lines: list, base: Path) -> list:
    """Each non-blank line that is not a '#' comment: a path (relative to the list's folder) or a URL."""
    locations = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            locations.append(entry if is_url(entry) else str((base / entry).resolve()))
    locations = list(dict.fromkeys(locations))
    # Names are the paths below the entries' common folder; a URL's path keeps its scheme as a first part.
    keys = [_url_key(entry) if is_url(entry) else entry for entry in locations]
    if not keys:
        return []
    common = posixpath.commonpath([posixpath.dirname(k) for k in keys]) if len(keys) > 1 else posixpath.dirname(keys[0])
    return [Source(location, posixpath.relpath(key, common)) for location, key in zip(locations, keys)]


def _url_key(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return "/" + scheme + "/" + rest.lstrip("/")


def _remote_sources(url: str) -> list:
    import fsspec

    filesystem, path = fsspec.core.url_to_fs(url)
    if GLOB_CHARACTERS.search(path):
        root = _glob_root(path)
        matches = sorted(p for p in filesystem.glob(path) if filesystem.isfile(p))
    elif filesystem.isdir(path):
        root = path
        matches = sorted(p for p in filesystem.find(path) if _wanted(posixpath.basename(p))
                         and not any(part.startswith(".") for part in posixpath.relpath(p, path).split("/")))
    elif filesystem.isfile(path):
        if os.path.splitext(path)[1].lower() in LIST_EXTENSIONS:
            with filesystem.open(path, "r", encoding="utf-8") as handle:
                return _listed_sources_remote(handle.read().splitlines(), url)
        root, matches = posixpath.dirname(path), [path]
    else:
        raise BulkError(f"{url}: nothing there (no such file, folder or glob)")
    return [Source(filesystem.unstrip_protocol(p), posixpath.relpath(p, root)) for p in matches]


def _listed_sources_remote(lines: list, list_url: str) -> list:
    """A list stored beside the documents: relative entries are relative to the list's own folder."""
    folder = list_url.rsplit("/", 1)[0]
    absolute = [line if (is_url(line.strip()) or not line.strip() or line.strip().startswith("#"))
                else f"{folder}/{line.strip()}" for line in lines]
    return _listed_sources(absolute, Path("."))


# ---------------------------------------------------------------- reading


@dataclass
class Fetched:
    path: Path  # a local file holding the document's bytes
    content_hash: str  # SHA-256 of the bytes, hex
    size: int


@contextlib.contextmanager
def fetched(location: str) -> Iterator[Fetched]:
    """The document's bytes in a local file, hashed; a remote one is copied to a temporary file first.
    OSError when it cannot be read."""
    digest, size = hashlib.sha256(), 0
    if not is_url(location):
        with open(location, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        yield Fetched(Path(location), digest.hexdigest(), size)
        return
    import fsspec

    with tempfile.TemporaryDirectory(prefix="bulk-ocr-") as folder:
        local = Path(folder) / "document"
        with fsspec.open(location, "rb") as source, open(local, "wb") as target:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                target.write(chunk)
        yield Fetched(local, digest.hexdigest(), size)


# ---------------------------------------------------------------- the output folder


def fingerprint(options, settings, ignore_eos: bool = False) -> dict:
    """What decides a document's output besides its bytes: the predictor's options, the limits and the
    generation rules. A rerun with a different fingerprint redoes the document."""
    values = dict(options.as_dict(), max_pages=settings.max_pages, max_pixels=settings.max_pixels,
                  pdf_dpi=settings.pdf_dpi, repetition_rule=settings.repetition_rule, stop_loops=settings.stop_loops)
    if ignore_eos:
        values["ignore_eos"] = True
    return values


def record(source: Source, status: str, content_hash: Optional[str], size: Optional[int], options: dict, *,
           pages: int = 0, tokens: int = 0, seconds: float = 0.0, stop_reasons: tuple = (),
           error: Optional[str] = None) -> dict:
    """A manifest line (the README's "Bulk OCR" section describes each column)."""
    done = status == OK
    return {
        "document": source.name,
        "source": source.location,
        "content_hash": content_hash,
        "bytes": size,
        "status": status,
        "error": error,
        "pages": pages,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "stop_reasons": list(stop_reasons),
        "output_json": f"{source.name}/{DOCUMENT_JSON}" if done else None,
        "output_markdown": f"{source.name}/{DOCUMENT_MARKDOWN}" if done else None,
        "options": options,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class OutputFolder:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest = self.root / MANIFEST
        self.staging = self.root / STAGING
        self._lock = threading.Lock()
        self._handle = None

    def open(self) -> dict:
        """Prepare the folder for a run; returns document name → its latest manifest line."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.staging, ignore_errors=True)  # what a killed run had not committed
            self.staging.mkdir()
            latest = self._read_manifest()
            self._handle = open(self.manifest, "a", encoding="utf-8")
        except OSError as error:
            raise BulkError(f"the output folder {self.root} cannot be used: {error}") from None
        return latest

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        shutil.rmtree(self.staging, ignore_errors=True)

    def _read_manifest(self) -> dict:
        if not self.manifest.exists():
            return {}
        data = self.manifest.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut by a kill: it never counted
            with open(self.manifest, "r+b") as handle:
                handle.truncate(end)
        latest = {}
        for line in data[:end].decode("utf-8").splitlines():
            try:
                entry = json.loads(line)
                latest[entry["document"]] = entry
            except (ValueError, KeyError, TypeError):
                continue
        return latest

    def is_done(self, previous: Optional[dict], content_hash: str, options: dict, retry_refused: bool = False) -> bool:
        """Whether a document with this content and these options was already finished (and, if it
        succeeded, its output is still there)."""
        if previous is None or previous.get("content_hash") != content_hash or previous.get("options") != options:
            return False
        if previous.get("status") == OK:
            return (self.root / previous["output_json"]).is_file()
        return previous.get("status") == REFUSED and not retry_refused

    def new_staging_folder(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.staging))

    def document_folder(self, name: str) -> Path:
        parts = name.split("/")
        if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] in RESERVED:
            raise BulkError(f"the document name {name!r} cannot be an output folder")
        return self.root.joinpath(*parts)

    def commit(self, entry: dict, staged: Optional[Path]) -> None:
        """Put a staged document folder in place (replacing an older one) and append its manifest line. A
        document that did not succeed keeps no folder."""
        target = self.document_folder(entry["document"])
        for path in staged.rglob("*") if staged is not None else ():
            if path.is_file():
                _sync_file(path)
        old = None
        if target.exists() or target.is_symlink():
            old = self.staging / f"replaced-{uuid.uuid4().hex}"
            os.replace(target, old)
        if staged is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            _sync_folder(target.parent)
        self.append(entry)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def append(self, entry: dict) -> None:
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())


def _sync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _sync_folder(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_files(folder: Path, files: list) -> None:
    """Files given as {"path": relative path, "data": bytes} (what a Ray worker returns) under `folder`."""
    for item in files:
        path = folder.joinpath(*item["path"].split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item["data"])


def read_files(folder: Path) -> list:
    return [{"path": p.relative_to(folder).as_posix(), "data": p.read_bytes()}
            for p in sorted(folder.rglob("*")) if p.is_file()]


# ---------------------------------------------------------------- pages in flight


class PageBudget:
    """At most `limit` pages held at once (rendered, queued or decoding); a document larger than the limit
    still goes through, alone."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.used = 0
        self._changed = threading.Condition()

    def acquire(self, pages: int, abandon: Optional[threading.Event] = None) -> bool:
        """Wait for room; False if `abandon` was set first."""
        with self._changed:
            while not (self.used == 0 or self.used + pages <= self.limit):
                if abandon is not None and abandon.is_set():
                    return False
                self._changed.wait(0.2)
            self.used += pages
            return True

    def release(self, pages: int) -> None:
        with self._changed:
            self.used -= pages
            self._changed.notify_all()

    def resize(self, limit: int) -> None:
        """A new limit (the engine's, once it is loaded), at once for those waiting."""
        with self._changed:
            self.limit = max(1, limit)
            self._changed.notify_all()
