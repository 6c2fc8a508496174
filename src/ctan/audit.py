"""`ctan audit`: is every number in a summary still what the files behind it give?

For each row of ``results/summary.csv`` (written by `ctan summarize`) the audit

- recomputes the row from the metrics.json files it names, with `ctan.summary.dataset_rows` (the code
  that wrote it), and compares every column;
- re-hashes those metrics.json files (``metrics_sha256``), the models each of them was computed from
  (their ``provenance.model_sha256``), the preprocessed folder (``data_hash``, DVC's md5) and the raw
  folder: every file against the ``source.json`` that `ctan download` wrote, every case's source files
  against the preprocessed manifest, and the source digest against ``source_sha256``.

Given the parameter files the summary was made with (``--params``), it also checks that the summary
holds every test set, architecture and seed they ask for, made with those settings (``params_hash``):
the rows alone cannot show that a whole architecture or dataset was removed.

It prints ``CHANGED line N: ...`` for every row affected, then ``FILE <path>: <problem>`` for each
changed file with the summary lines it is behind, and a ``REBUILD`` command. Snakemake decides by
modification times and does not look inside folder outputs, so after in-place damage it reports
"Nothing to be done": the command forces the damaged outputs (``--forcerun``), and Snakemake reruns
everything downstream of them. A raw folder that is absent altogether (raw data are often not shared)
is reported as ``NOT CHECKED`` rather than changed. Exit status: 0 if nothing changed, 1 otherwise.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctan.errors import CtanError
from ctan.provenance import dvc_md5, file_sha256

_MISSING = "missing"


@dataclass
class Damage:
    """One changed file: what is wrong, which output to rebuild, and the summary lines behind it."""

    problems: list[str]
    target: str
    lines: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Grid:
    """What a run's parameters ask a summary to hold: {test set: (architectures, seeds, params_hash)}."""

    sets: dict[str, tuple[list[str], list[int], str]]
    source: str  # the parameter files, for messages

    def asked(self, name: str) -> tuple[list[str], list[int]]:
        archs, seeds, _ = self.sets.get(name, ([], [], ""))
        return archs, seeds


def grid_of(params: dict[str, Any], source: str) -> Grid:
    from ctan.results import evaluated_sets
    from ctan.summary import settings_hash

    archs = list(params["run"]["architectures"])
    return Grid({s.name: (archs, list(s.seeds), settings_hash(s)) for s, _ in evaluated_sets(params)}, source)


class _Audit:
    def __init__(self, summary: Path, at: dict[int, dict[str, str]], grid: Grid | None = None) -> None:
        self.summary = summary
        self.rows = list(at.values())
        self.at = at  # {line of summary.csv: its row}: blank lines a hand edit left still count
        self.grid = grid
        self.reasons: dict[int, list[str]] = {}
        self.damage: dict[str, Damage] = {}
        self.notes: list[str] = []
        self._sha: dict[str, str] = {}

    def sha256(self, path: str) -> str:
        if path not in self._sha:
            self._sha[path] = file_sha256(Path(path)) if Path(path).is_file() else _MISSING
        return self._sha[path]

    def flag(self, file: str | None, problem: str, target: str, lines: Iterable[int], reason: str) -> None:
        """Record a changed ``file`` (None: only a consequence of one) and the ``reason`` on each line."""
        damage = self.damage.setdefault(file, Damage([], target)) if file else None
        if damage is not None and problem not in damage.problems:
            damage.problems.append(problem)
        for line in lines:
            if damage is not None:
                damage.lines.add(line)
            self.reasons.setdefault(line, [])
            if reason not in self.reasons[line]:
                self.reasons[line].append(reason)

    def by(self, column: str) -> dict[str, list[int]]:
        """{value of ``column``: summary lines}, in order of appearance."""
        out: dict[str, list[int]] = {}
        for line, row in self.numbered():
            out.setdefault(row[column], []).append(line)
        return out

    def numbered(self) -> Iterable[tuple[int, dict[str, str]]]:
        return self.at.items()

    # --- the files behind the rows ---------------------------------------------------------------------

    def check_data(self) -> None:
        for data_path, lines in self.by("data_path").items():
            now = dvc_md5(Path(data_path)) if Path(data_path).is_dir() else _MISSING
            recorded = {self.at[i]["data_hash"] for i in lines}
            if now in recorded:
                # The data are what (some) rows record: any other value is an edit of those rows, which
                # `recompute` names, not a change of the data.
                continue
            if {now} != recorded:
                was = ", ".join(sorted(h[:12] for h in recorded))
                problem = f"content changed (DVC md5 {was} -> {now[:12]}){_arrays_changed(data_path)}"
                self.flag(data_path, problem, data_path, lines, f"data {data_path} changed")

    def check_raw(self) -> None:
        from ctan.fetch import SOURCE_JSON, hash_tree
        from ctan.manifest import MANIFEST

        for raw_path, lines in self.by("raw_path").items():
            raw = Path(raw_path)
            reason = f"raw sources in {raw_path} changed"
            if not raw.exists():
                self.notes.append(f"NOT CHECKED {raw_path}: absent, so the raw sources were not re-hashed")
                continue
            marker = raw / SOURCE_JSON
            try:
                record = json.loads(marker.read_text())
                recorded = dict(record["files"])
            except (OSError, ValueError, KeyError, TypeError):
                self.flag(str(marker), "missing or unreadable", raw_path, lines, reason)
                continue
            sources = {self.at[i]["source_sha256"] for i in lines} - {""}
            if sources and sources != {record.get("sha256")}:
                had = str(record.get("sha256"))[:12]
                problem = f"records source SHA-256 {had}…, the summary {', '.join(sorted(sources))}"
                self.flag(str(marker), problem, raw_path, lines, reason)
            _, now = hash_tree(raw)
            now.pop(SOURCE_JSON, None)
            expected = dict(recorded)
            for data_path in {self.at[i]["data_path"] for i in lines}:
                try:
                    manifest = json.loads((Path(data_path) / MANIFEST).read_text())
                    for case in manifest["cases"]:
                        # Sources read from outside the raw folder (absolute) are not its to check.
                        expected.update(
                            (rel, sha) for rel, sha in case["sources"].items() if not Path(rel).is_absolute()
                        )
                except (OSError, ValueError, KeyError, TypeError):
                    pass  # a damaged data folder is reported by check_data
            for rel in sorted(set(expected) | set(now)):
                if rel not in now:
                    problem = "missing"
                elif rel not in expected:
                    problem = "not part of the download (added since)"
                elif now[rel] != expected[rel]:
                    problem = f"SHA-256 changed ({expected[rel][:12]} -> {now[rel][:12]})"
                else:
                    continue
                self.flag(str(raw / rel), problem, raw_path, lines, reason)

    def check_metrics_and_models(self) -> None:
        models_behind: dict[str, dict[str, str]] = {}  # metrics.json -> the models it names, read once
        for line, row in self.numbered():
            behind = _pairs(row["metrics_sha256"])
            models = _pairs(row["model_sha256"])
            for path, recorded in behind.items():
                self._check_file(path, recorded, line, f"{path} changed")
                if path not in models_behind:
                    try:
                        models_behind[path] = json.loads(Path(path).read_text())["provenance"]["model_sha256"]
                    except (OSError, ValueError, KeyError, TypeError):
                        models_behind[path] = {}  # reported above as changed or missing
                models.update(models_behind[path])
            for path, recorded in models.items():
                self._check_file(path, recorded, line, f"model {path} changed")

    def _check_file(self, path: str, recorded: str, line: int, reason: str) -> None:
        now = self.sha256(path)
        if now != recorded:
            problem = "missing" if now == _MISSING else f"SHA-256 changed ({recorded[:12]} -> {now[:12]})"
            self.flag(path, problem, path, [line], reason)

    def check_grid(self) -> None:
        """Every test set the parameters ask for is there, made with their settings, and no other."""
        if self.grid is None:
            return
        summary, source = str(self.summary), self.grid.source
        present = self.by("dataset")
        for name in self.grid.sets:
            if name not in present:
                self.flag(summary, f"lacks every row of {name}, which {source} ask for", summary, [], "")
        for name, lines in present.items():
            if name not in self.grid.sets:
                problem = f"holds rows of {name}, which {source} do not ask for"
                self.flag(summary, problem, summary, lines, f"{name} is not in {source}")
                continue
            want = self.grid.sets[name][2]
            made = Counter(self.at[i]["params_hash"] for i in lines).most_common(1)[0][0]
            if made != want:
                problem = (
                    f"rows of {name} were made with other settings (params_hash {made}; {source} give {want})"
                )
                self.flag(summary, problem, summary, lines, f"made with other settings than {source}")

    # --- the numbers ----------------------------------------------------------------------------------

    def recompute(self) -> None:
        """Rebuild each dataset's rows from its metrics.json files with the summary's own code."""
        from ctan.layout import SINGLE_TASK
        from ctan.results import read_docs
        from ctan.summary import COLUMNS, dataset_rows, format_row

        key_columns = ("row_type", "dataset", "architecture", "seed", "task", "metric")
        summary = str(self.summary)
        for dataset, lines in self.by("dataset").items():
            # STL first: every row is relative to it, so a summary without its STL rows still gets them
            # recomputed (and reported missing) instead of not being checked at all.
            # With the parameters, also what they ask for: a removed architecture or seed is then missing.
            asked_archs, asked_seeds = self.grid.asked(dataset) if self.grid else ([], [])
            archs = [*asked_archs, *(self.at[i]["architecture"] for i in lines)]
            archs = list(dict.fromkeys([SINGLE_TASK, *archs]))
            seeds = [
                *asked_seeds,
                *(int(self.at[i]["seed"]) for i in lines if self.at[i]["row_type"] == "metric"),
            ]
            seeds = list(dict.fromkeys(seeds))
            # What most rows record: one edited row must not make every other row look changed.
            where = {
                k: Counter(self.at[i][k] for i in lines).most_common(1)[0][0]
                for k in ("data_hash", "data_path", "raw_path", "results_path", "params_hash", "trained_on")
            }
            trained_on = where["trained_on"] if where["trained_on"] != dataset else None
            try:
                docs = read_docs(Path(where["results_path"]), dataset, trained_on, archs, seeds)
                again = dataset_rows(dataset, archs, seeds, docs, where)
            except CtanError as err:
                # A metrics.json that is damaged, misplaced or from another evaluation: the rows behind it
                # cannot be vouched for.
                file = err.path or summary
                self.flag(file, err.problem, file, lines, f"{file} is not what the rows were computed from")
                continue
            except (KeyError, TypeError, ValueError) as err:
                self.flag(
                    summary,
                    f"rows of {dataset} cannot be recomputed ({err})",
                    summary,
                    lines,
                    "not recomputed",
                )
                continue
            expected = {tuple(r[c] for c in key_columns): r for r in map(format_row, again)}
            for i in lines:
                row = self.at[i]
                want = expected.pop(tuple(row[c] for c in key_columns), None)
                if want is None:
                    self.flag(
                        summary, "holds rows the files behind it do not give", summary, [i], "no such row"
                    )
                    continue
                # metrics_sha256 holds the files' current hashes here: compared in check_metrics_and_models.
                diffs = [c for c in COLUMNS if c != "metrics_sha256" and row[c] != want[c]]
                if diffs:
                    said = ", ".join(f"{c} {row[c]} (the files give {want[c]})" for c in diffs)
                    # Edited in summary.csv itself, unless a file behind the row changed (named already).
                    edited = not any(self.damage.get(p) for p in _pairs(row["metrics_sha256"]))
                    problem = "numbers differ from the files behind them"
                    self.flag(summary if edited else None, problem, summary, [i], f"{summary}: {said}")
            if expected:
                missing = ["/".join(key) for key in expected]
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                problem = f"lacks {len(missing)} row(s) the files give: {', '.join(missing[:3])}{more}"
                self.flag(summary, problem, summary, [], "")

    # --- the report -----------------------------------------------------------------------------------

    def report(self) -> int:
        for line in sorted(self.reasons):
            print(f"CHANGED line {line}: {_what(self.at[line])}: " + "; ".join(self.reasons[line]))
        for file, damage in self.damage.items():
            where = f"; behind line(s) {_ranges(damage.lines)}" if damage.lines else ""
            print(f"FILE {file}: {'; '.join(damage.problems)}{where}")
        for note in self.notes:
            print(note)
        if self.damage:
            targets = " ".join(dict.fromkeys(d.target for d in self.damage.values()))
            print(
                f"REBUILD: snakemake --cores 8 {self.summary} --forcerun {targets}"
                " (Snakemake does not notice changes inside its outputs by itself; add the --configfile"
                " you ran with) or: dvc repro summarize"
            )
        ok = len(self.rows) - len(self.reasons)
        print(f"{self.summary}: {ok} of {len(self.rows)} rows unchanged")
        return 1 if self.damage or self.reasons else 0


def audit(summary: Path, grid: Grid | None = None) -> int:
    """Re-check every row of a summary (see the module docstring); 0 if all unchanged, 1 otherwise."""
    from ctan.summary import COLUMNS

    if not summary.is_file():
        raise CtanError(summary, "not found; run `snakemake --cores 8 results/summary.csv` first")
    try:
        with open(summary, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            at = {}  # {line: row}; csv.DictReader skips blank lines, which still count as lines
            for row in reader:
                at[reader.line_num] = row
    except (UnicodeDecodeError, csv.Error) as err:
        kind = type(err).__name__
        raise CtanError(summary, f"not a summary CSV ({kind}); rebuild it with `ctan summarize`") from None
    if not at:
        raise CtanError(summary, "has no rows; rebuild it with `ctan summarize`")
    missing = [c for c in COLUMNS if c not in next(iter(at.values()))]
    if missing:
        raise CtanError(
            summary,
            f"not a summary this ctan can audit (no {', '.join(missing)} column); "
            "rebuild it with `ctan summarize`",
        )
    for line, row in at.items():
        problem = _row_problem(row)
        if problem:
            raise CtanError(summary, f"line {line}: {problem}; rebuild it with `ctan summarize`")
    check = _Audit(summary, at, grid)
    check.check_grid()
    check.check_raw()
    check.check_data()
    check.check_metrics_and_models()
    check.recompute()
    return check.report()


def _row_problem(row: dict[str, Any]) -> str | None:
    """What makes a row unreadable for the audit (a damaged summary, not a changed number), or None."""
    if None in row:
        return "more fields than the header"
    if any(value is None for value in row.values()):
        return "fewer fields than the header (cut short?)"
    if row["row_type"] == "metric" and not row["seed"].isdigit():
        return f"seed {row['seed']!r} is not a seed"
    for column in ("metrics_sha256", "model_sha256"):
        if any("=" not in item for item in filter(None, row[column].split(";"))):
            return f"{column} is not a list of file=SHA-256"
    return None


def _arrays_changed(data_path: str) -> str:
    """Which arrays differ from the manifest, when that can be told (else nothing)."""
    from ctan.manifest import verify_stores

    try:
        arrays = verify_stores(Path(data_path))
    except Exception:  # a store too damaged to open: the folder hash has said enough
        return ""
    if not arrays:
        return ""
    more = f" and {len(arrays) - 5} more" if len(arrays) > 5 else ""
    return "; arrays changed: " + ", ".join(arrays[:5]) + more


def _pairs(text: str) -> dict[str, str]:
    """``path=sha;path=sha`` as a dict."""
    return dict(item.rsplit("=", 1) for item in filter(None, text.split(";")))


def _what(row: dict[str, str]) -> str:
    return f"{row['dataset']}/{row['architecture']}/seed {row['seed']}/{row['task']}/{row['metric']}"


def _ranges(lines: Iterable[int]) -> str:
    """2, 3, 4, 7 -> "2-4, 7"."""
    out: list[list[int]] = []
    for n in sorted(lines):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)
