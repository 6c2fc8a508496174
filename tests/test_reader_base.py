"""The readers' shared table helpers: one wording for a bad CSV, one cache that notices a changed file."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from ctan.datasets.base import cached_per_file, read_table
from ctan.datasets.splits import read_split_file
from ctan.errors import CtanError


def test_read_table_names_the_file_and_the_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("a,c\n1,2\n")
    assert read_table(path, ("a", "c")).columns.tolist() == ["a", "c"]
    with pytest.raises(CtanError) as err:
        read_table(path, ("a", "b", "d"))
    assert str(err.value) == f"{path}: missing column(s) b, d"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CtanError, match="not a readable CSV"):
        read_table(path, ("a",))


def test_a_header_with_spaces_after_the_commas_names_its_columns(tmp_path: Path) -> None:
    """ "a, b" was refused as "missing column(s) b" although the header plainly names b."""
    path = tmp_path / "labels.csv"
    path.write_text("a, b ,c\n1,2,3\n")
    assert read_table(path, ("a", "b", "c")).columns.tolist() == ["a", "b", "c"]


def test_a_semicolon_separated_table_says_so(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("a;b\n1;2\n")
    with pytest.raises(CtanError, match="missing column\\(s\\) a, b; separated by ';'"):
        read_table(path, ("a", "b"))


def test_a_split_file_without_its_columns_says_which_it_expects(tmp_path: Path) -> None:
    path = tmp_path / "split.csv"
    path.write_text("case,fold\nc1,train\n")
    with pytest.raises(CtanError) as err:
        read_split_file(path, "case", ["c1"])
    assert str(err.value) == f"{path}: missing column(s) split; expected case,split"
    path.write_text("id,fold\nc1,train\n")
    with pytest.raises(CtanError) as err:
        read_split_file(path, "case", ["c1"])
    assert str(err.value) == f"{path}: missing column(s) case, split; expected case,split"


def test_cached_per_file_reads_again_only_when_the_file_changes(tmp_path: Path) -> None:
    reads: list[Path] = []

    @cached_per_file
    def read(path: Path) -> pd.DataFrame:
        reads.append(path)
        return pd.read_csv(path)

    path = tmp_path / "labels.csv"
    path.write_text("a\n1\n")
    assert read(path) is read(path)
    assert reads == [path]
    path.write_text("a\n1\n2\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert len(read(path)) == 2
    assert len(reads) == 2
    with pytest.raises(CtanError) as err:
        read(tmp_path / "absent.csv")
    assert str(err.value) == f"{tmp_path / 'absent.csv'}: missing"
