"""OpenKBP (AAPM 2020 grand challenge): head-and-neck CT, IMRT dose and contours in sparse CSVs.

Layout (the official repository's ``provided-data`` folder)::

    provided-data/{train-pats,validation-pats,test-pats}/pt_<n>/
        ct.csv  dose.csv  possible_dose_mask.csv  voxel_dimensions.csv  <structure>.csv ...

Every volume lives on a 128×128×128 grid. A CSV has the header ``,data``; each row is a flat index into
that grid (C order, as ``np.put`` uses it in the challenge's ``provided_code``) and, for ``ct`` and
``dose``, a value; mask CSVs (``possible_dose_mask`` and the structures) leave the data column empty.
Voxels not listed are 0.

Values: ``dose`` is in Gy. ``ct`` holds HU + 1024, never below 0 (the sample's densest voxels, metal,
reach 32,743): unlisted voxels, 0, are air at −1024 HU; the air peak of the sample lies at ≈ 20
(−1004 HU), fat at ≈ 920 (−104 HU), soft tissue at ≈ 1050 — and the challenge winners' converter
subtracts 1024 too.

Axes. The challenge array ``raw[i, j, k]`` is (rows, columns, slices): ``i`` runs anterior→posterior,
``j`` patient right→left and ``k`` superior→inferior (checked on the sample: the mandible has smaller
``i`` than the spinal cord, the right parotid smaller ``j`` than the left, the brainstem smaller ``k``
than the oesophagus), i.e. (+y, +x, −z) in DICOM's LPS frame. We store

    ours[z, y, x] = raw[y, x, 127 − z]            (`from_challenge_grid`; inverse `to_challenge_grid`)

so that (z, y, x) point to (superior, posterior, left): LPS with an identity direction matrix. The
origin is 0: OpenKBP publishes no patient position. ``voxel_dimensions.csv`` holds three numbers in mm:
the in-plane pixel spacing twice (equal in every released patient, so their order does not matter) and
the slice spacing third; our spacing is (slice, pixel, pixel).

The official split is kept: train-pats → train, validation-pats (or the older valid-pats) →
validation, test-pats → test. A folder that holds ``pt_*`` patients directly (e.g. a copy of the
official ``test-pats``, another site's patients) is a dataset root too: all its patients are test cases.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from ctan.datasets.base import Case, CaseRef, check_dose
from ctan.errors import CtanError
from ctan.tasks import DOSE, Task, structures_task

FORMAT = "openkbp"
SPATIAL_DIMS = 3
WORLD = "LPS"  # (z, y, x) point to (superior, posterior, left), an identity direction (module docstring)
MARKER = "provided-data"

GRID: tuple[int, int, int] = (128, 128, 128)
GRID_SIZE = int(np.prod(GRID))
CT_OFFSET = 1024.0  # ct.csv stores HU + 1024
CT_STORED_MAX = 65535.0  # a 16-bit CT number; the sample's densest voxel (metal) is 32743
SPACING_MM = (0.05, 50.0)  # plausible CT voxel dimensions in mm (the sample: 1.5-5.4)

OARS: tuple[str, ...] = (
    "Brainstem",
    "SpinalCord",
    "RightParotid",
    "LeftParotid",
    "Esophagus",
    "Larynx",
    "Mandible",
)
TARGETS: tuple[str, ...] = ("PTV56", "PTV63", "PTV70")
STRUCTURES: tuple[str, ...] = OARS + TARGETS  # channel order, as the challenge's data loader stacks them
REQUIRED: tuple[str, ...] = ("ct", "dose", "possible_dose_mask", "voxel_dimensions")

# Split folder names in the official release (valid-pats in the repository's early README) -> our split.
SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train-pats",),
    "validation": ("validation-pats", "valid-pats"),
    "test": ("test-pats",),
}

TASKS: dict[str, Task] = {
    "dose": DOSE,
    "structures": structures_task(STRUCTURES),
}

_PATIENT = re.compile(r"pt_(\d+)")
_KNOWN_CSVS = {name.lower(): name for name in (*REQUIRED, *STRUCTURES)}
_ONE_THREAD = pa_csv.ReadOptions(use_threads=False)


def structure_names(root: Path | None = None) -> list[str]:
    """The fixed channel order of the ``structures`` target."""
    return list(STRUCTURES)


def class_names(root: Path | None = None) -> list[str]:
    """OpenKBP has no image-level classes."""
    return []


def from_challenge_grid(raw: np.ndarray) -> np.ndarray:
    """Challenge (i, j, k) = (y, x, −z) array -> our (z, y, x); works on (..., 128, 128, 128) too."""
    return np.ascontiguousarray(np.moveaxis(raw, -1, -3)[..., ::-1, :, :])


def to_challenge_grid(volume: np.ndarray) -> np.ndarray:
    """Our (z, y, x) array -> challenge (i, j, k) order, e.g. to write a prediction CSV the scorer reads."""
    return np.ascontiguousarray(np.moveaxis(volume[..., ::-1, :, :], -3, -1))


def _patient_key(folder: Path) -> tuple[int, str]:
    match = _PATIENT.fullmatch(folder.name)
    return (int(match.group(1)) if match else 1 << 30, folder.name)


def holds_patients(folder: Path) -> bool:
    """Whether ``folder`` holds ``pt_<n>`` patients directly (a bare split folder such as test-pats)."""
    try:
        return any(_PATIENT.fullmatch(p.name) and (p / "ct.csv").is_file() for p in Path(folder).iterdir())
    except OSError:
        return False


def is_root(folder: Path) -> bool:
    """A dataset root: the release's parent of provided-data/, or a bare folder of pt_* patients."""
    return (Path(folder) / MARKER).exists() or holds_patients(folder)


def _split_folders(root: Path) -> dict[str, Path]:
    data = Path(root) / MARKER
    if not data.is_dir() and holds_patients(root):
        return {"test": Path(root)}
    if not data.is_dir():
        raise CtanError(data, "missing; an OpenKBP dataset root holds provided-data/ (or pt_* patients)")
    known = [name for names in SPLIT_FOLDERS.values() for name in names]
    for folder in sorted(data.iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and folder.name not in known:
            # Its patients would be left out without a word (a renamed Test-pats, a val-pats).
            raise CtanError(
                folder,
                "not an OpenKBP split folder; the release's are train-pats, validation-pats (or valid-pats) "
                "and test-pats: rename or remove it",
            )
    out = {}
    for split, names in SPLIT_FOLDERS.items():
        found = [data / name for name in names if (data / name).is_dir()]
        if len(found) > 1:  # the second one's patients would be left out without a word
            raise CtanError(
                found[1], f"a second {split} folder beside {found[0].name}: merge its patients into that one"
            )
        if found:
            out[split] = found[0]
    if not out:
        raise CtanError(data, "no train-pats, validation-pats or test-pats folder")
    return out


def list_cases(root: Path, split_params: dict | None = None) -> list[CaseRef]:
    """Every patient folder, in the official split (``split_params`` is ignored: the split is given)."""
    refs: list[CaseRef] = []
    for split, folder in _split_folders(root).items():
        patients = sorted(
            (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_patient_key
        )
        for patient in patients:
            if not _PATIENT.fullmatch(patient.name):
                raise CtanError(
                    patient,
                    "not an OpenKBP patient folder name (pt_<number>); a copy such as 'pt_40 copy' would "
                    "be read as one more patient: rename or remove it",
                )
            _csv_files(patient)  # every required file there, every name known
            refs.append(CaseRef(patient.name, split))
    if not refs:
        raise CtanError(Path(root) / MARKER, "no patient folders (pt_*) found")
    ids = [r.case_id for r in refs]
    if len(set(ids)) != len(ids):
        raise CtanError(Path(root) / MARKER, "the same patient folder name appears in two splits")
    return refs


def read_sparse(path: Path, with_values: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(flat challenge indices, values or None) of one sparse CSV, checked against the 128³ grid.

    The one parser of the format in ctan: the dose metrics read reference and predicted CSVs with it.
    Arrow's CSV reader, on one thread because the workflow gives each job one core: reading a case this
    way, scatter into volumes included, costs 0.65-0.80x what ``pandas.read_csv`` alone needs for the
    same files (benchmarks/preprocess.py). Its float parser rounds correctly; pandas' default one can
    be off in the last bit.
    """
    if not path.is_file():
        raise CtanError(path, "missing")
    data = path.read_bytes()
    for magic, kind in _COMPRESSED:
        if data.startswith(magic):
            raise CtanError(path, f"is {kind}, not a CSV: unpack it first")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise CtanError(path, "is UTF-16 text (Excel's 'Unicode text'?): save it as UTF-8 or ASCII")
    if data and not data.endswith((b"\n", b"\r")):
        raise CtanError(path, "ends inside a row (cut short?); a complete OpenKBP CSV ends with a line break")
    try:
        table = pa_csv.read_csv(pa.py_buffer(data), read_options=_ONE_THREAD)
    except (pa.ArrowException, ValueError, UnicodeDecodeError) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise CtanError(path, f"not a readable OpenKBP CSV: {_printable(lines[-1])}") from None
    if table.column_names[1:] != ["data"]:
        found = table.column_names
        hint = "; separated by ';' instead of ','?" if b";" in data[:200] else ""
        raise CtanError(path, f"expected the header ',data', found columns {found}{hint}")
    index, column = table.column(0), table.column(1)
    if not table.num_rows:
        return np.empty(0, dtype=np.int64), (np.empty(0) if with_values else None)
    if not pa.types.is_integer(index.type) or index.null_count:
        raise CtanError(path, "voxel indices are not all integers (garbled or truncated file?)")
    indices = index.to_numpy().astype(np.int64, copy=False)
    if indices.min() < 0 or indices.max() >= GRID_SIZE:
        bad = int(indices[(indices < 0) | (indices >= GRID_SIZE)][0])
        raise CtanError(path, f"voxel index {bad} lies outside the 128x128x128 grid")
    if not _all_different(indices):
        raise CtanError(path, "a voxel index is listed twice")
    if not with_values:
        if column.null_count != len(column):
            raise CtanError(path, "a mask CSV must leave the data column empty")
        return indices, None
    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
        raise CtanError(path, "values are not all numbers (garbled file?)")
    values = column.cast(pa.float64()).to_numpy()  # a missing value (empty, nan, NA) reads as NaN
    if np.isnan(values).any():
        raise CtanError(path, f"{int(np.isnan(values).sum())} voxel(s) have no value (NaN or truncated row)")
    if np.isinf(values).any():
        raise CtanError(path, "infinite values")
    return indices, values


_COMPRESSED = (
    (b"\x1f\x8b", "gzip-compressed"),
    (b"PK\x03\x04", "a zip archive"),
    (b"BZh", "bzip2-compressed"),
)


def _printable(text: str, limit: int = 120) -> str:
    """A parser's message fit for one terminal line: a binary file's bytes can end up in it."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _csv_files(folder: Path) -> dict[str, Path]:
    """{name: path} of a patient's CSVs, each required one present and every name known.

    Names are matched exactly, as the release spells them; a name that differs only in case
    (``Brainstem.CSV``, ``brainstem.csv``) is an error with the fix, not a structure silently missing.
    """
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() != ".csv" or not path.is_file():
            continue
        name = _KNOWN_CSVS.get(path.stem.lower())
        if name is None:
            raise CtanError(path, f"unknown structure {path.stem!r}; OpenKBP has {', '.join(STRUCTURES)}")
        if path.name != f"{name}.csv":
            raise CtanError(path, f"file names are case-sensitive: rename it to {name}.csv")
        out[name] = path
    for name in REQUIRED:
        if name not in out:
            raise CtanError(folder / f"{name}.csv", "missing (every OpenKBP patient needs it)")
    return out


def _all_different(indices: np.ndarray) -> bool:
    """Whether no flat index repeats: at once for the release's files (ascending), else by marking voxels."""
    if (np.diff(indices) > 0).all():
        return True
    seen = np.zeros(GRID_SIZE, dtype=bool)
    seen[indices] = True
    return int(np.count_nonzero(seen)) == len(indices)


def our_flat_index(challenge_index: np.ndarray) -> np.ndarray:
    """Flat challenge indices (i, j, k) -> flat indices of our (z, y, x) volume, z = 127 − k, y = i, x = j.

    Remapping the few listed indices is much cheaper than transposing whole scattered volumes. The
    challenge index is ``(i * 128 + j) * 128 + k``, so one divmod gives ``i * 128 + j`` and ``k``
    (several times faster than unravel_index + ravel_multi_index, which also re-check the bounds
    `read_sparse` has checked).
    """
    ij, k = np.divmod(challenge_index, GRID[2])
    return (GRID[2] - 1 - k) * (GRID[0] * GRID[1]) + ij


def _dense(
    indices: np.ndarray, values: np.ndarray | float, dtype: type, out: np.ndarray | None = None
) -> np.ndarray:
    """Scatter flat challenge indices into a zero (z, y, x) volume (or into ``out``)."""
    volume = np.zeros(GRID_SIZE, dtype=dtype) if out is None else out.reshape(-1)
    volume[our_flat_index(indices)] = values
    return volume.reshape(GRID[2], GRID[0], GRID[1])


def read_spacing(path: Path) -> tuple[float, float, float]:
    """(z, y, x) spacing in mm from ``voxel_dimensions.csv`` (pixel, pixel, slice)."""
    if not path.is_file():
        raise CtanError(path, "missing")
    try:
        with warnings.catch_warnings():  # numpy warns about an empty file; the size check says it
            warnings.simplefilter("ignore")
            dims = np.loadtxt(path, dtype=np.float64, ndmin=1, encoding="utf-8-sig")
    except ValueError as err:
        raise CtanError(path, f"not three numbers: {_printable(str(err))}") from None
    if dims.shape != (3,):
        raise CtanError(path, f"expected three voxel dimensions, found {dims.size}")
    if not np.all(np.isfinite(dims)) or np.any(dims <= 0):
        raise CtanError(path, f"voxel dimensions must be positive, found {dims.tolist()}")
    low, high = SPACING_MM
    if np.any(dims < low) or np.any(dims > high):
        raise CtanError(
            path,
            f"voxel dimensions {dims.tolist()} are not CT voxel sizes in mm ({low}-{high}); metres or cm?",
        )
    return float(dims[2]), float(dims[0]), float(dims[1])


def reference_folders(root: Path, splits: tuple[str, ...] = ("test",)) -> list[Path]:
    """The folders of ``splits`` that hold reference patients, as the challenge's scorer reads them."""
    folders = _split_folders(root)
    return [folders[s] for s in splits if s in folders]


def patient_folder(root: Path, ref: CaseRef) -> Path:
    """Where a case's CSVs live."""
    folders = _split_folders(root)
    if ref.split not in folders:
        raise CtanError(Path(root) / MARKER, f"no folder for split {ref.split!r}")
    return folders[ref.split] / ref.case_id


def _listing(path: Path, with_values: bool) -> tuple[np.ndarray, np.ndarray]:
    """`read_sparse` of a file that must list voxels: an empty CT, dose or possible-dose mask is a
    broken export (an empty structure file is not: the structure may be absent)."""
    idx, values = read_sparse(path, with_values)
    if not len(idx):
        raise CtanError(path, "lists no voxels")
    return idx, values if values is not None else np.empty(0)


def read_case(root: Path, ref: CaseRef) -> Case:
    """One patient: CT (HU), dose (Gy), possible-dose mask and the ten structure channels, in (z, y, x)."""
    folder = patient_folder(root, ref)
    if not folder.is_dir():
        raise CtanError(folder, "patient folder not found")
    csvs = _csv_files(folder)

    spacing = read_spacing(csvs["voxel_dimensions"])
    idx, values = _listing(csvs["ct"], with_values=True)
    if values.min() < 0 or values.max() > CT_STORED_MAX:
        bad = values.min() if values.min() < 0 else values.max()
        raise CtanError(
            csvs["ct"],
            f"CT value {bad:g} outside 0-{CT_STORED_MAX:g}: ct.csv holds HU + 1024 (0 is -1024 HU); "
            "a CT in HU must be shifted by +1024 first",
        )
    ct = np.full(GRID_SIZE, -CT_OFFSET, dtype=np.float32)
    ct = _dense(idx, values - CT_OFFSET, np.float32, out=ct)
    idx, values = _listing(csvs["dose"], with_values=True)
    check_dose(values, csvs["dose"])
    dose = _dense(idx, values, np.float32)
    idx, _ = _listing(csvs["possible_dose_mask"], with_values=False)
    possible = _dense(idx, 1, np.uint8)

    structures = np.zeros((len(STRUCTURES), GRID[2], GRID[0], GRID[1]), dtype=np.uint8)
    present = []  # a header-only CSV is no contour: nothing to score, as the challenge's DVH scorer skips it
    for c, name in enumerate(STRUCTURES):
        idx = read_sparse(csvs[name], with_values=False)[0] if name in csvs else np.empty(0, np.int64)
        _dense(idx, 1, np.uint8, out=structures[c])
        present.append(bool(len(idx)))

    return Case(
        case_id=ref.case_id,
        split=ref.split,
        image=ct[None],
        spacing=spacing,
        origin=(0.0, 0.0, 0.0),
        direction=tuple(np.eye(3).ravel().tolist()),
        dense={"dose": dose[None], "possible_dose_mask": possible[None], "structures": structures},
        structure_present=tuple(present),
        sources=tuple(sorted(csvs.values())),
    )
