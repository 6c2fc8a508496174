"""STOIC 2021: chest CT of suspected COVID-19 patients, labels COVID-19 (RT-PCR) and severity.

Layout (the public training set as released on AWS, ``s3://stoic2021-training``)::

    data/mha/<PatientID>.mha
    metadata/reference.csv        PatientID,probCOVID,probSevere[,age,sex]
    split.csv                     optional: PatientID,split (overrides the computed split)

Labels: ``covid`` = probCOVID and ``severity`` = probSevere; the public reference file holds 0/1 only
(severe = intubation or death within one month), so anything else is refused rather than thresholded.
The CT is read with SimpleITK, which reports geometry in (x, y, z) order in the LPS world frame; we
reverse spacing and origin and permute the direction matrix (``D_zyx = D_xyz[::-1, ::-1]``) so that
``world_zyx = origin + D @ (spacing * index_zyx)`` holds for our (z, y, x) arrays.

No official split of the public set exists: we split by PatientID (one scan per patient) with the split
parameters, stratified by (covid, severity).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ctan.datasets.base import Case, CaseRef, cached_per_file, check_hu, check_orthogonal, read_table
from ctan.datasets.splits import assign_splits, read_split_file
from ctan.errors import CtanError
from ctan.tasks import Task, label_task

T = TypeVar("T")

FORMAT = "stoic"
SPATIAL_DIMS = 3
WORLD = "LPS"  # ITK's world, reversed to (z, y, x) order: listed (S, P, L)
MARKER = "metadata/reference.csv"

CLASS_NAMES: tuple[str, ...] = ()
STRUCTURES: tuple[str, ...] = ()
REFERENCE_COLUMNS: tuple[str, ...] = ("PatientID", "probCOVID", "probSevere")
MHA_FOLDER = "data/mha"
SPLIT_FILE = "split.csv"

TASKS: dict[str, Task] = {
    "covid": label_task("covid", ("negative", "positive"), ("auc",)),
    "severity": label_task("severity", ("not severe", "severe"), ("auc_covid_positive",)),
}


def structure_names(root: Path | None = None) -> list[str]:
    """STOIC has no dense targets."""
    return []


def class_names(root: Path | None = None) -> list[str]:
    """Both STOIC tasks are binary; there is no multi-class label."""
    return []


@cached_per_file
def _reference(path: Path) -> pd.DataFrame:
    table = read_table(path, REFERENCE_COLUMNS, dtype={"PatientID": str})
    if table.empty:
        raise CtanError(path, "lists no patients")
    table["PatientID"] = table["PatientID"].str.strip()
    if (table["PatientID"].fillna("") == "").any():
        raise CtanError(path, "a row has no PatientID")
    duplicated = table["PatientID"][table["PatientID"].duplicated()]
    if len(duplicated):
        raise CtanError(path, f"PatientID {duplicated.iloc[0]} is listed twice")
    for column in ("probCOVID", "probSevere"):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = ~values.isin([0, 1])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value, patient = table[column].iloc[row], table["PatientID"].iloc[row]
            shown = repr(value.item() if isinstance(value, np.generic) else value)
            raise CtanError(path, f"{column} must be 0 or 1, found {shown} for patient {patient}")
        table[column] = values.astype(int)
    # Severity is graded among COVID-19 patients (the 2,000 released rows: no severe case without it).
    inconsistent = table[(table["probSevere"] == 1) & (table["probCOVID"] == 0)]
    if len(inconsistent):
        patient = inconsistent["PatientID"].iloc[0]
        raise CtanError(path, f"patient {patient} is severe (probSevere 1) without COVID-19 (probCOVID 0)")
    return table.set_index("PatientID")


def read_reference(root: Path) -> pd.DataFrame:
    """The checked label table, indexed by PatientID (a string, as in the file names)."""
    return _reference(Path(root) / MARKER)


def mha_path(root: Path, patient_id: str) -> Path:
    return Path(root) / MHA_FOLDER / f"{patient_id}.mha"


def list_cases(root: Path, split_params: dict | None = None) -> list[CaseRef]:
    """Every patient of reference.csv with its split; each needs its ``.mha``."""
    root = Path(root)
    ref = read_reference(root)
    ids = list(ref.index)
    present = set(os.listdir(root / MHA_FOLDER)) if (root / MHA_FOLDER).is_dir() else set()
    for patient_id in ids:
        if f"{patient_id}.mha" not in present:
            raise CtanError(mha_path(root, patient_id), _missing(patient_id, present))
    split_file = root / SPLIT_FILE
    if split_file.is_file():
        by_patient = read_split_file(split_file, "PatientID", ids)
    else:
        strata = dict(zip(ids, ref["probCOVID"] * 2 + ref["probSevere"], strict=True))
        by_patient = assign_splits(strata, split_params)
    return [CaseRef(i, by_patient[i]) for i in sorted(ids, key=lambda i: (len(i), i))]


def _missing(patient_id: str, names: set[str]) -> str:
    """ "missing", naming the file probably meant where one differs in case or extension (1.MHA, 1.mhd)
    or in leading zeros (0007.mha for 7: a spreadsheet drops them from a PatientID column)."""

    def same(stem: str) -> bool:
        return stem.casefold() == patient_id.casefold() or (
            stem.isdigit() and patient_id.isdigit() and int(stem) == int(patient_id)
        )

    near = sorted(n for n in names if same(n.split(".", 1)[0]))
    hint = f"; found {near[0]}: the release's volumes are <PatientID>.mha, one file each" if near else ""
    return f"missing (listed in metadata/reference.csv){hint}"


MHA_HEADER_BYTES = 1 << 16  # a MetaImage header is a few hundred bytes of "Key = value" lines


def _mha_header(path: Path) -> tuple[dict[str, str], int] | None:
    """({key (lower case): value}, byte offset of the data) of a MetaImage file's text header, or None
    where it is not one that ends in ``ElementDataFile`` (ITK then says what is wrong)."""
    with open(path, "rb") as fh:
        head = fh.read(MHA_HEADER_BYTES)
    keys: dict[str, str] = {}
    offset = 0
    for line in head.split(b"\n"):
        offset += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            return None
        keys[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            return keys, offset
    return None


def _check_mha(path: Path, header: tuple[dict[str, str], int] | None, data_bytes: int) -> None:
    """Refuse what ITK reads without a word: no voxel spacing (it assumes 1 mm), or voxel data of
    another size than the header's DimSize and ElementType describe. ITK reads the first voxels of
    more data (slices dropped) and, from compressed data that inflates to less, leaves the rest of the
    volume as whatever memory held (slices of garbage)."""
    if header is None:
        return
    keys, offset = header
    if "elementspacing" not in keys and "elementsize" not in keys:
        raise CtanError(path, "the header gives no ElementSpacing: ITK would take 1 mm voxels; add it")
    _check_numbers(path, keys)
    if keys.get("elementdatafile", "").upper() != "LOCAL" or "headersize" in keys:
        return
    if keys.get("compresseddata", "false").lower() == "true":
        stored, consumed = _inflated_size(path, offset)
        _check_compressed_size(path, keys, consumed)
        what = f"holds voxel data that inflates to {stored} bytes"
    else:
        stored = path.stat().st_size - offset
        what = f"holds {stored} bytes of voxel data"
    if stored != data_bytes:
        raise CtanError(
            path, f"{what}, but its header (DimSize, ElementType) describes {data_bytes}: a wrong DimSize?"
        )


INFLATE_CHUNK = 1 << 20


def _inflated_size(path: Path, offset: int) -> tuple[int, int]:
    """(bytes inflated, bytes of the file consumed) of the zlib (or gzip) stream after a MetaImage
    header, inflated a chunk at a time (a CT's voxels are not held twice), as ITK's MetaIO inflates it."""
    inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)  # 32: a zlib or gzip header, as MetaIO accepts
    size = consumed = 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        try:
            while not inflate.eof and (chunk := fh.read(INFLATE_CHUNK)):
                consumed += len(chunk)
                while chunk and not inflate.eof:
                    size += len(inflate.decompress(chunk, INFLATE_CHUNK))
                    chunk = inflate.unconsumed_tail
        except zlib.error as err:
            raise CtanError(
                path, f"says CompressedData = True, but its voxel data is not zlib-compressed ({err})"
            ) from None
    if not inflate.eof:
        raise CtanError(path, "its compressed voxel data ends early (file cut short?)")
    return size, consumed - len(inflate.unused_data)


def _check_compressed_size(path: Path, keys: dict[str, str], consumed: int) -> None:
    """ITK inflates CompressedDataSize bytes: without the field, or with fewer bytes than the stream
    holds, it prints "Uncompress failed" and returns a volume of garbage without an error."""
    declared = keys.get("compresseddatasize")
    if declared is None:
        raise CtanError(
            path,
            f"compressed, but the header gives no CompressedDataSize (ITK would read garbage): "
            f"add 'CompressedDataSize = {consumed}' before ElementDataFile, or write it again with ITK",
        )
    if not declared.isdigit() or int(declared) < consumed:
        raise CtanError(
            path,
            f"header field CompressedDataSize = {declared!r}, but its compressed voxel data is "
            f"{consumed} bytes: ITK would inflate only part of it (garbage voxels); write it again with ITK",
        )


# Header fields of numbers and how many each holds (per NDims): ITK fills what is short or not a
# number with 0 without a word (an origin "1 nan 3" or "1 2" is read as (1, 0, 0) or (1, 2, 0)).
_MHA_NUMBERS = {
    "offset": 1, "origin": 1, "position": 1, "elementspacing": 1, "elementsize": 1, "dimsize": 1,
    "transformmatrix": 2, "rotation": 2, "orientation": 2,
}  # fmt: skip


def _check_numbers(path: Path, keys: dict[str, str]) -> None:
    try:
        ndims = int(keys.get("ndims", "3"))
    except ValueError:
        return  # ITK refuses it
    for key, power in _MHA_NUMBERS.items():
        if key not in keys:
            continue
        try:
            values = [float(v) for v in keys[key].split()]
        except ValueError:
            values = []
        if len(values) != ndims**power or not all(np.isfinite(values)):
            raise CtanError(
                path,
                f"header field {key} = {keys[key]!r} is not {ndims**power} finite numbers "
                f"(NDims = {ndims}): ITK would read what is missing as 0",
            )


def read_geometry(
    reader: sitk.ImageFileReader,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) in (z, y, x) order from an ITK image header in (x, y, z) order."""
    n = reader.GetDimension()
    spacing = tuple(float(s) for s in reversed(reader.GetSpacing()))
    origin = tuple(float(o) for o in reversed(reader.GetOrigin()))
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(n, n)[::-1, ::-1]
    return spacing, origin, tuple(direction.ravel().tolist())


def read_ct(path: Path) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """A 3D CT image file -> ((z, y, x) float32 HU, spacing, origin, direction), geometry checked first."""
    if not path.is_file():
        raise CtanError(path, "missing")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _itk(reader.ReadImageInformation, path, "header")
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise CtanError(
            path,
            f"expected a 3D scalar CT, found {reader.GetDimension()}D with "
            f"{reader.GetNumberOfComponents()} component(s)",
        )
    spacing, origin, direction = read_geometry(reader)
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise CtanError(path, f"voxel spacing must be positive, found {spacing} (z, y, x)")
    check_orthogonal(np.reshape(direction, (3, 3)), path)
    lengths = np.linalg.norm(np.reshape(direction, (3, 3)), axis=0)
    if not np.allclose(lengths, 1.0, atol=1e-3):
        raise CtanError(
            path,
            f"direction cosines of length {', '.join(f'{n:g}' for n in lengths)}, not 1: the spacing "
            "belongs in ElementSpacing, not in TransformMatrix",
        )
    header = _mha_header(path) if path.suffix.lower() == ".mha" else None
    image = _itk(reader.Execute, path, "data")
    stored = sitk.GetArrayViewFromImage(image)
    _check_mha(path, header, stored.nbytes)
    array = stored.astype(np.float32)
    check_hu(array, path)
    return array, spacing, origin, direction


def _itk(call: Callable[[], T], path: Path, part: str) -> T:
    """Run an ITK read; a failure is a `CtanError` with ITK's own explanation.

    ITK's MetaImage reader explains a failure on the process's stderr (from C++, past Python's
    sys.stderr) and raises an exception that says something else ("No such file or directory" for a
    file cut short), so that stream is collected while ITK reads and used for the message.
    """
    failure: RuntimeError | None = None
    with _stderr_lines() as said:
        try:
            return call()
        except RuntimeError as err:
            failure = err
    raise CtanError(path, f"unreadable image {part}: {_itk_message(failure, said)}") from None


@contextmanager
def _stderr_lines() -> Iterator[list[str]]:
    """What is written to file descriptor 2 inside the block, as stripped lines (empty if fd 2 is shut)."""
    lines: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace")
            lines += [line.strip() for line in text.splitlines() if line.strip()]


def _itk_message(err: RuntimeError | None, said: list[str]) -> str:
    """What ITK printed if anything (MetaImage: "data not read completely ideal = N : actual = M"), else
    its exception's error line without the C++ source location and object address."""
    if said:
        hint = " (file cut short?)" if any("not read completely" in line for line in said) else ""
        return " ".join(said)[:200] + hint
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = next((line for line in lines if "ERROR: " in line), lines[-1] if lines else "unknown error")
    return re.sub(r"^\w+\(0x[0-9a-f]+\): ", "", message.split("ERROR: ")[-1])[:200]


def read_case(root: Path, ref: CaseRef) -> Case:
    """One patient: CT (1, z, y, x) in HU with its geometry, labels covid and severity."""
    root = Path(root)
    table = read_reference(root)
    if ref.case_id not in table.index:
        raise CtanError(root / MARKER, f"patient {ref.case_id} is not listed")
    path = mha_path(root, ref.case_id)
    array, spacing, origin, direction = read_ct(path)
    row = table.loc[ref.case_id]
    return Case(
        case_id=ref.case_id,
        split=ref.split,
        image=array[None],
        spacing=spacing,
        origin=origin,
        direction=direction,
        labels={"covid": int(row["probCOVID"]), "severity": int(row["probSevere"])},
        sources=(path, root / MARKER),
    )
