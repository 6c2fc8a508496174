"""`ctan download`: fetch a dataset, verify its pinned SHA-256, extract it safely, move it into place.

A source is one of

- ``demo``: a synthetic dataset written in the real on-disk format (`ctan.datasets.demo.generate`);
- an ``https://`` URL of an archive: streamed to a temporary file, then handled as an archive;
- a local archive (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.xz``, ``.tar.bz2``, ``.zip``);
- a local folder: copied (hard-linked where possible); its digest is the SHA-256 over the sorted
  relative paths and file SHA-256s, the same as `ctan.provenance.tree_sha256`. Symlinks in it are
  followed (the copy holds the files they point to, and the digest is the copy's); a symlink to nothing
  or one that loops back to a folder holding it is refused before anything is copied.

Archives and URLs must be pinned (``datasets.<name>.sha256`` in params.yaml or ``--sha256``); an
unpinned or mismatching archive is refused with its actual digest in the message, so it can be pinned.
Entries with ``..``, absolute paths, links or device files are refused before anything is extracted.
Everything is built in a hidden folder next to the target and moved into place with `os.replace`,
``source.json`` (source, digest, every file's SHA-256) written last: an interrupted run never leaves a
complete-looking ``<paths.raw>/<dataset>/``.

Official sources (no network in tests, so these are documented rather than tested):

- OpenKBP: https://github.com/ababier/open-kbp/archive/ce625e62f3b04203f22bd9d1634f3e8fb0245e46.zip
  (the challenge repository at a fixed commit; ``provided-data/`` inside). Pin the digest the first
  download reports.
- HAM10000: the Harvard Dataverse release, doi:10.7910/DVN/DBW86T
  (https://dataverse.harvard.edu/dataset.xhtml?persistentId=doi:10.7910/DVN/DBW86T). It is a set of
  files (image zips, lesion segmentations, metadata), not one archive: unpack them into one folder in
  the official layout (``HAM10000_images/``, ``HAM10000_segmentations_lesion_tschandl/``,
  ``HAM10000_metadata.csv``) and pass that folder with ``--source``.
- STOIC 2021: the public AWS bucket s3://stoic2021-training (https://stoic2021-training.s3.amazonaws.com/).
  A bucket is not an archive: ``aws s3 sync --no-sign-request s3://stoic2021-training DIR`` and pass
  ``--source DIR``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from tqdm import tqdm

from ctan.config import DatasetSettings
from ctan.errors import CtanError
from ctan.provenance import file_sha256, tree_listing
from ctan.workspace import partial_folder

SOURCE_JSON = "source.json"
OFFICIAL_SOURCES = {
    "openkbp": "https://github.com/ababier/open-kbp/archive/ce625e62f3b04203f22bd9d1634f3e8fb0245e46.zip",
    "ham10000": "https://dataverse.harvard.edu/dataset.xhtml?persistentId=doi:10.7910/DVN/DBW86T",
    "stoic": "s3://stoic2021-training",
}
STOIC_BUCKET_HOSTS = ("stoic2021-training.s3.amazonaws.com",)
DEMO_COUNTS = {"train": 8, "validation": 2, "test": 2}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BLOCK = 1 << 20
_IGNORED = (".snakemake_timestamp",)


# ---------------------------------------------------------------------------------------------------
# Digests


def hash_tree(folder: Path) -> tuple[str, dict[str, str]]:
    """(folder digest, {relative path: sha256}) with a progress bar: `ctan.provenance.tree_listing`."""
    return tree_listing(folder, _IGNORED, progress=True)


def _pin(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    pinned = sha256.strip().lower()
    if not _SHA256.match(pinned):
        raise CtanError(None, f"--sha256 {sha256!r} is not a SHA-256 (64 hex digits)")
    return pinned


def _verify(path: str | Path, actual: str, pinned: str | None, settings: DatasetSettings) -> None:
    if pinned is None:
        raise CtanError(
            path,
            f"no pinned SHA-256 for this archive; its SHA-256 is {actual}: set datasets.{settings.name}."
            f"sha256 in the params file or pass --sha256 {actual}",
        )
    if actual != pinned:
        raise CtanError(path, f"SHA-256 mismatch: expected {pinned}, got {actual}")


def _verify_folder(source: str, digest: str, pinned: str | None) -> None:
    if pinned is not None and digest != pinned:
        raise CtanError(source, f"SHA-256 mismatch (folder digest): expected {pinned}, got {digest}")


# ---------------------------------------------------------------------------------------------------
# Safe extraction


def unsafe_entry_name(name: str) -> str | None:
    """Why an archive entry name must not be extracted (absolute, or climbing out with ``..``), or None."""
    unix = name.replace("\\", "/")
    if unix.startswith("/") or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        return "absolute path"
    if ".." in PurePosixPath(unix).parts:
        return "path with '..'"
    return None


def _check_tar(archive: Path, members: list[tarfile.TarInfo]) -> None:
    for m in members:
        problem = unsafe_entry_name(m.name)
        if problem is None and (m.issym() or m.islnk()):
            problem = "link"
        elif problem is None and (m.ischr() or m.isblk() or m.isfifo() or m.isdev()):
            problem = "device or special file"
        elif problem is None and not (m.isfile() or m.isdir()):
            problem = "unsupported entry type"
        if problem:
            raise CtanError(archive, f"refusing to extract entry {m.name!r}: {problem}")


def _check_zip(archive: Path, infos: list[zipfile.ZipInfo]) -> None:
    for info in infos:
        problem = unsafe_entry_name(info.filename)
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0 where the writer recorded no Unix file type
        if problem is None and kind == stat.S_IFLNK:
            problem = "link"
        elif problem is None and kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            problem = "device or special file"
        if problem:
            raise CtanError(archive, f"refusing to extract entry {info.filename!r}: {problem}")


_DECOMPRESSORS = ((b"\x1f\x8b", gzip.open), (b"\xfd7zXZ\x00", lzma.open), (b"BZh", bz2.open))


def _plain_tar(archive: Path, scratch: Path) -> Path:
    """The archive as an uncompressed tar, so members can be checked before one is extracted without
    decompressing twice (a compressed tar has no index)."""
    with open(archive, "rb") as fh:
        magic = fh.read(6)
    for prefix, opener in _DECOMPRESSORS:
        if magic.startswith(prefix):
            out = scratch / "archive.tar"
            try:
                with opener(archive, "rb") as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, _BLOCK)
            except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:
                raise CtanError(archive, f"corrupt or truncated archive: {err}") from None
            return out
    return archive


def extract_archive(archive: Path, dest: Path, scratch: Path) -> None:
    """Extract a tar or zip archive into ``dest`` after checking every entry (``scratch``: temp space)."""
    if zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                _check_zip(archive, infos)
                for info in tqdm(infos, desc="extracting", unit="file", disable=None, leave=False):
                    zf.extract(info, dest)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
            raise CtanError(archive, f"corrupt zip archive: {err}") from None
        except NotImplementedError:  # e.g. Deflate64, which Windows Explorer writes for large zips
            raise CtanError(
                archive,
                "zip compression method not supported by Python's zipfile (Deflate64, as Windows Explorer "
                "writes for large files?): unpack it with 7-Zip or unzip and pass the folder as the source",
            ) from None
        except RuntimeError:  # zipfile's word for an encrypted entry (NotImplementedError is one too)
            raise CtanError(
                archive, "encrypted zip archive (password required): unpack it yourself and pass the folder"
            ) from None
        return
    plain = _plain_tar(archive, scratch)
    try:
        with tarfile.open(plain, "r:") as tf:
            members = tf.getmembers()
            _check_tar(archive, members)
            for m in tqdm(members, desc="extracting", unit="file", disable=None, leave=False):
                # The "data" filter also leaves folders' modes alone: a read-only one would refuse the
                # files after it, and later its deletion, to a non-root user.
                tf.extract(m, dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise CtanError(
            archive, f"not a readable .tar, .tar.gz, .tgz, .tar.xz, .tar.bz2 or .zip archive: {err}"
        ) from None
    finally:
        if plain != archive:
            plain.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# Sources


def _source_kind(source: str) -> str:
    if source == "demo":
        return "demo"
    lowered = source.lower()
    if lowered.startswith("s3://") or any(
        lowered.startswith(f"https://{host}") and lowered.rstrip("/").endswith(host)
        for host in STOIC_BUCKET_HOSTS
    ):
        raise CtanError(
            source,
            "an S3 bucket is not an archive: run `aws s3 sync --no-sign-request "
            "s3://stoic2021-training DIR` and pass --source DIR",
        )
    if lowered.startswith("https://"):
        return "url"
    if re.match(r"^[a-z][a-z0-9+.-]*://", lowered):
        raise CtanError(source, "only https:// URLs, `demo`, local archives and folders are supported")
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "archive"
    raise CtanError(
        source, "no such file or folder (a source is `demo`, an https URL, an archive or a folder)"
    )


def download_url(url: str, dest: Path) -> str:
    """Stream ``url`` into ``dest`` with a progress bar; return its SHA-256."""
    from ctan import __version__

    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": f"ctan/{__version__}"})
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as fh:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="downloading", disable=None
            ) as bar:
                for block in iter(lambda: response.read(_BLOCK), b""):
                    fh.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise CtanError(url, f"download failed: {err}") from None
    if total is not None and received != total:
        raise CtanError(url, f"download truncated: {received} of {total} bytes")
    return digest.hexdigest()


def _link_or_copy(src: str, dst: str) -> None:
    # Large datasets (a synced bucket) should not be duplicated on disk where a hard link will do.
    # The file a symlink points to, not the symlink (Linux's link() would link the symlink itself:
    # a relative one would then point nowhere, an absolute one outside the download).
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_folder(folder: Path, data: Path) -> None:
    """Copy (hard-link where possible) a folder source; a file that cannot be copied is one line. The
    copied folders are made writable by their owner: copytree gives them the source's modes, and a
    read-only one could not be replaced (`--force`) or deleted by a non-root user."""
    try:
        shutil.copytree(folder, data, dirs_exist_ok=True, copy_function=_link_or_copy)
        for sub in [data, *(p for p in data.rglob("*") if p.is_dir() and not p.is_symlink())]:
            mode = sub.stat().st_mode
            if not mode & stat.S_IWUSR:
                sub.chmod(mode | stat.S_IWUSR)
    except shutil.Error as err:  # copytree goes on past a failure and reports (src, dst, why) for each
        failed = err.args[0] if err.args and isinstance(err.args[0], list) else []
        src, why = (failed[0][0], failed[0][2]) if failed and len(failed[0]) == 3 else (folder, str(err))
        raise CtanError(src, f"could not be copied from the folder source: {why}") from None
    except OSError as err:
        raise CtanError(err.filename or folder, f"could not be copied: {err.strerror or err}") from None


def _check_folder(folder: Path) -> bool:
    """Refuse a folder source that cannot be copied: a symlink to nothing, or one to a folder that holds
    it (a loop); True if it holds symlinks (they are followed: the copy holds what they point to)."""
    links = False
    top = folder.stat()
    stack = [(folder, frozenset({(top.st_dev, top.st_ino)}))]  # (folder, the real folders down to it)
    while stack:
        directory, above = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as err:
            raise CtanError(directory, f"cannot be listed: {err.strerror}") from None
        for entry in entries:
            link = entry.is_symlink()
            try:
                target = entry.stat(follow_symlinks=True)
            except OSError:
                raise CtanError(
                    entry.path, "a symlink to nothing (or a loop of links): remove it or restore its target"
                ) from None
            links = links or link
            if not stat.S_ISDIR(target.st_mode):
                continue
            key = (target.st_dev, target.st_ino)
            # A link to any folder above it (inside the source or not) would be copied into itself.
            if key in above or (
                link and Path(directory).resolve().is_relative_to(Path(entry.path).resolve())
            ):
                raise CtanError(
                    entry.path, "a symlink to a folder that holds it (a loop): remove it from the source"
                )
            stack.append((Path(entry.path), above | {key}))
    return links


def _demo_identity(settings: DatasetSettings) -> dict[str, Any]:
    default = {"test": DEMO_COUNTS["test"]} if settings.external_of else dict(DEMO_COUNTS)
    counts = {k: int(v) for k, v in settings.demo.items() if k != "seed"} or default
    return {"format": settings.format, "counts": counts, "seed": int(settings.demo.get("seed", 0))}


# ---------------------------------------------------------------------------------------------------
# The command


def _existing(raw_dir: Path, same: Any, force: bool) -> bool:
    """True if ``raw_dir`` already holds this source (nothing to do); raise if it holds another."""
    if not raw_dir.exists():
        return False
    marker = raw_dir / SOURCE_JSON
    if not marker.is_file():
        if raw_dir.is_dir() and not any(raw_dir.iterdir()):
            return False
        if force:
            return False
        raise CtanError(
            raw_dir, "exists but is not a complete download (no source.json); remove it or pass --force"
        )
    if force:  # replaced whatever it holds, a damaged record included
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise CtanError(marker, f"unreadable: {err}; pass --force to replace the download") from None
    if same(recorded):
        return True
    raise CtanError(
        raw_dir,
        f"already holds another source ({recorded.get('source')}, "
        f"sha256 {str(recorded.get('sha256'))[:12]}…); pass --force to replace it",
    )


def _check_dataset(data: Path, settings: DatasetSettings, source: str) -> tuple[Path, int]:
    """Find the dataset root and list its cases now, so a wrong archive fails here, not in preprocess."""
    from ctan.datasets import dataset_cases, find_root

    try:
        if settings.subdir:
            root = data / settings.subdir
            if not root.is_dir():
                raise CtanError(root, "the configured subdir does not exist in the source")
        else:
            root = find_root(data, settings.format)
        refs = dataset_cases(settings, root)
    except CtanError as err:
        inside = err.path
        if inside is not None:
            try:
                inside = Path(inside).relative_to(data).as_posix() or "."
            except ValueError:
                pass
        where = f"{inside}: " if inside else ""
        raise CtanError(source, f"not a usable {settings.format} dataset: {where}{err.problem}") from None
    if not refs:
        raise CtanError(source, f"contains no {settings.format} cases")
    return root, len(refs)


def _install(work: Path, data: Path, raw_dir: Path) -> None:
    """Move the finished folder into place; a replaced one goes to the work folder to be deleted."""
    if raw_dir.exists():
        os.replace(raw_dir, work / "replaced")
    os.replace(data, raw_dir)


def download_dataset(
    settings: DatasetSettings, source: str | None = None, sha256: str | None = None, force: bool = False
) -> Path:
    """Fetch the dataset into ``settings.raw_dir`` (see the module docstring); return that folder."""
    source = str(source or settings.source)
    pinned = _pin(sha256 if sha256 is not None else settings.sha256)
    raw_dir = Path(settings.raw_dir)
    kind = _source_kind(source)

    identity: dict[str, Any] = {}
    digest: str | None = None
    listing: dict[str, str] | None = None
    if kind == "demo":
        identity = _demo_identity(settings)
        if _existing(raw_dir, lambda r: r.get("kind") == "demo" and r.get("demo") == identity, force):
            print(f"{raw_dir}: already holds this demo dataset; nothing to do")
            return raw_dir
    elif kind == "archive":
        digest = file_sha256(Path(source).expanduser())
        _verify(source, digest, pinned, settings)
    elif kind == "folder":
        folder = Path(source).expanduser().resolve()
        if raw_dir.resolve().is_relative_to(folder):
            raise CtanError(
                source, f"holds the download's own folder {raw_dir}: a folder source is copied into it"
            )
        if _check_folder(folder):
            digest = None  # symlinks are followed: the digest is the copy's, taken once it is made
        else:
            digest, listing = hash_tree(Path(source).expanduser())
            _verify_folder(source, digest, pinned)
    elif kind == "url":
        digest = pinned  # known only after the download when unpinned (which is then refused)
    if digest is not None and _existing(raw_dir, lambda r: r.get("sha256") == digest, force):
        print(f"{raw_dir}: already holds {source} (sha256 {digest[:12]}…); nothing to do")
        return raw_dir

    with partial_folder(raw_dir) as work:
        data = work / "data"
        data.mkdir()
        if kind == "demo":
            from ctan.datasets.demo import generate

            generate(settings.format, data, counts=dict(identity["counts"]), seed=identity["seed"])
        elif kind == "url":
            fetched = work / "download"
            actual = download_url(source, fetched)
            _verify(source, actual, pinned, settings)
            extract_archive(fetched, data, work)
            fetched.unlink()
            digest = actual
        elif kind == "archive":
            extract_archive(Path(source).expanduser(), data, work)
        else:
            _copy_folder(Path(source).expanduser(), data)
            if digest is None:  # a folder with symlinks: what was copied is what is recorded
                digest, listing = hash_tree(data)
                _verify_folder(source, digest, pinned)
                if _existing(raw_dir, lambda r: r.get("sha256") == digest, force):
                    print(f"{raw_dir}: already holds {source} (sha256 {digest[:12]}…); nothing to do")
                    return raw_dir
        root, n_cases = _check_dataset(data, settings, source)
        # A copied folder was hashed at its source; everything else is hashed as extracted.
        tree_digest, files = (digest, listing) if kind == "folder" else hash_tree(data)
        record = {
            "dataset": settings.name,
            "format": settings.format,
            "source": source,
            "kind": kind,
            "sha256": digest if digest is not None else tree_digest,
            "tree_sha256": tree_digest,
            "root": root.relative_to(data).as_posix(),
            "cases": n_cases,
            **({"demo": identity} if kind == "demo" else {}),
            "files": files,
        }
        (data / SOURCE_JSON).write_text(json.dumps(record, indent=1) + "\n")
        _install(work, data, raw_dir)
    print(f"{raw_dir}: {n_cases} cases from {source}")
    return raw_dir
