"""Read interaction logs from disk into the canonical tables of :mod:`asft.data.schema`.

Supported formats (``format=`` argument, or ``"auto"`` to detect from the directory contents):

``movielens-100k``
    A directory with ``u.data`` (tab-separated ``user item rating timestamp``, no header) and
    optionally ``u.item`` (``|``-separated, latin-1, 19 genre flags) and ``u.genre``.
``movielens-dat``
    A directory with ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``; ml-1m, ml-10m) and
    optionally ``movies.dat`` (``MovieID::Title::Genres``).
``movielens-csv``
    A directory with ``ratings.csv`` (``userId,movieId,rating,timestamp``; ml-20m, ml-25m, ml-latest)
    and optionally ``movies.csv`` (``movieId,title,genres``).
``recbole``
    Atomic files ``<name>.inter`` and optionally ``<name>.item``: tab-separated, with a header of
    ``field:type`` names (``user_id:token item_id:token rating:float timestamp:float``).
``generic``
    One CSV or Parquet interactions file plus a column mapping (canonical -> source column), with
    an optional item catalog. Without a mapping the usual column names are recognised.

Every malformed input raises :class:`~asft.data.schema.DataFormatError` naming the file, the line
(1-based, the header line counts) or the column, and what is wrong. Only parsing and typing are
checked here; value ranges, duplicates and the like belong to the validation stage.
Nothing is dropped and the row order of the file is kept.

Parsing is vectorised (pyarrow's CSV reader and compute kernels); Python loops over lines run
only after a failure, to find the offending line.
"""

from __future__ import annotations

import ast
import contextvars
import csv
import re
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from asft.data.paths import PathContainmentError, inside, require_data_root, resolve_inside
from asft.data.schema import (
    GENRES,
    ITEM,
    RATING,
    TITLE,
    TS,
    USER,
    DataFormatError,
    InteractionData,
)

if TYPE_CHECKING:  # pragma: no cover
    from asft.config import DataConfig

__all__ = ["FORMATS", "ML100K_GENRES", "detect_format", "load_dataset", "load_from_config"]

FORMATS = ("movielens-100k", "movielens-dat", "movielens-csv", "recbole", "generic")

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)

_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
_PARQUET_SUFFIXES = (".parquet", ".pq")

# Column names recognised when a generic file comes without a mapping (first match wins).
_USER_NAMES = ("user_id", "userId", "user", "reviewerID")
_ITEM_NAMES = ("item_id", "asin", "itemId", "movieId", "item")
_TS_NAMES = ("timestamp", "unixReviewTime")
_ORDER_NAMES = ("seq_pos", "order", "position")
_RATING_NAMES = ("rating", "overall")
_TITLE_NAMES = ("title", "movie_title", "name")
_GENRE_NAMES = ("genres", "categories", "genre", "class")

_INT_RE = r"^[+-]?[0-9]+$"
_NUM_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_DIGITS_RE = r"^[0-9]+$"
_ISO_RE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([ T][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?)?(Z|[+-][0-9]{2}:?[0-9]{2})?$"
_I64_MIN = Decimal(-(2**63))
_I64_MAX = Decimal(2**63 - 1)
_FIELDS_RE = re.compile(r"Expected (\d+) columns, got (\d+)")

# The resolved data directory of the load in progress: every file opened must resolve inside it.
_DATA_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("asft_data_dir", default=None)


# --------------------------------------------------------------------------------------------
# Sources: one input file, read column by column, that can point at its own lines.
# --------------------------------------------------------------------------------------------


def _check_contained(path: Path) -> None:
    """Refuse a file that resolves (symlinks, '..') outside the data directory being loaded."""
    root = _DATA_DIR.get()
    if root is None:
        return
    try:
        real = path.resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise DataFormatError(path, f"cannot resolve path: {e}") from None
    if not inside(real, root):
        raise DataFormatError(path, f"resolves to {real}, outside the data directory {root} (a symlink or '..'"
                              " escape); data files must live inside data.source")


def _check_file(path: Path, what: str = "file") -> None:
    try:
        if not path.exists():
            raise DataFormatError(path, f"{what} not found")
        _check_contained(path)
        if path.is_dir():
            raise DataFormatError(path, f"expected a {what}, found a directory")
        size = path.stat().st_size
    except OSError as e:  # permissions, name too long, ...
        raise DataFormatError(path, f"cannot read {what}: {e}") from None
    if size == 0:
        raise DataFormatError(path, "file is empty (0 bytes)")


def _short(value: Any, n: int = 40) -> str:
    s = repr(value)
    return s if len(s) <= n else s[: n - 3] + "..."


class _Source:
    """An input file: its column names, its data (read on demand) and error reporting."""

    path: Path
    columns: list[str]
    n: int

    def __init__(self, path: Path):
        self.path = path
        self.columns = []
        self.n = 0
        self._data: dict[str, pa.Array] = {}

    # -- reading ------------------------------------------------------------------------------
    def require(self, col: str, role: str, hint: str = "") -> None:
        if col not in self.columns:
            avail = ", ".join(repr(c) for c in self.columns)
            raise DataFormatError(
                self.path, f"column {col!r} ({role}) not found; available columns: [{avail}]{hint}", column=col
            )

    def read(self, cols: list[str]) -> None:
        raise NotImplementedError

    def check_unique(self, cols: list[str]) -> None:
        """A column to read that appears twice in the file is ambiguous."""
        for c in cols:
            k = self.columns.count(c)
            if k > 1:
                raise DataFormatError(self.path, f"column name {c!r} appears {k} times; rename the duplicates",
                                      column=c)

    def col(self, name: str) -> pa.Array:
        return self._data[name]

    # -- error reporting -----------------------------------------------------------------------
    def row_labels(self, rows: np.ndarray) -> list[int]:
        """What DataFormatError's ``rows`` holds: file line numbers (text) or row positions."""
        raise NotImplementedError

    @property
    def row_word(self) -> str:
        return "line"

    def fail(self, col: str, problem: str, mask: np.ndarray, values: pa.Array | None = None) -> None:
        rows = np.flatnonzero(mask)
        if len(rows) == 0:
            return
        labels = self.row_labels(rows[:20])
        sample = f", e.g. {_short(values[int(rows[0])].as_py())}" if values is not None else ""
        listed = "file line numbers" if self.row_word == "line" else "0-based row positions"
        raise DataFormatError(
            self.path,
            f"{problem}{sample} ({len(rows)} of {self.n} data rows; {listed} follow)",
            line=labels[0] if self.row_word == "line" else None,
            column=col,
            rows=labels,
        )


class _TextSource(_Source):
    """A delimited text file read with pyarrow's CSV reader (all columns as strings)."""

    def __init__(self, path: Path, *, sep: str, header: bool = True, names: list[str] | None = None,
                 quoting: bool = False, field_sep: str | None = None, n_fields: int | None = None):
        super().__init__(path)
        _check_file(path)
        self.sep = sep
        self.header = header
        self.quoting = quoting
        self.field_sep = field_sep or sep  # how fields are counted in messages ('::' for .dat files)
        self.n_fields = n_fields  # expected count in field_sep units (defaults to len(columns))
        self.encoding = "utf8"
        if header:
            self.columns = self._read_header()
        else:
            self.columns = list(names or [])
        self._record_lines: list[int] | None = None

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            self.encoding = "latin-1"
            return raw.decode("latin-1")

    def _read_header(self) -> list[str]:
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(2)
                fh.seek(0)
                if head in (b"\xff\xfe", b"\xfe\xff"):
                    raise DataFormatError(self.path, "file is UTF-16 encoded; save it as UTF-8 (or latin-1)", line=1)
                for number, raw in _physical_lines(fh):
                    if raw:
                        break
                else:
                    raise DataFormatError(self.path, "file holds only blank lines (no header, no data)")
        except OSError as e:
            raise DataFormatError(self.path, f"cannot read file: {e}") from None
        if b"\x00" in raw:
            raise DataFormatError(self.path, "header line contains NUL bytes: a binary file, or text in UTF-16/32"
                                  " (save it as UTF-8)", line=number)
        line = self._decode(raw)
        if self.quoting:
            try:
                names = next(csv.reader([line], delimiter=self.sep, quotechar='"', doublequote=True))
            except csv.Error as e:
                raise DataFormatError(self.path, f"cannot parse the header line: {e}", line=number) from None
        else:
            names = line.split(self.sep)
        return names

    def _options(self, cols: list[str], encoding: str):
        read = pacsv.ReadOptions(
            column_names=None if self.header else self.columns,
            encoding=encoding,
            use_threads=True,
        )
        parse = pacsv.ParseOptions(
            delimiter=self.sep,
            quote_char='"' if self.quoting else False,
            double_quote=True,
            escape_char=False,
            newlines_in_values=self.quoting,
            ignore_empty_lines=True,
        )
        convert = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in self.columns},
            include_columns=cols,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
            null_values=[],
        )
        return read, parse, convert

    def read(self, cols: list[str]) -> None:
        cols = list(dict.fromkeys(cols))
        if self.header:
            self.check_unique(cols)
        encodings = ["utf8", "latin-1"] if self.encoding == "utf8" else ["latin-1"]
        table = None
        for enc in encodings:
            source: Any = str(self.path)
            try:
                if enc == "latin-1" and self.header and self.encoding == "utf8" and self._starts_with_bom():
                    # UTF-8 BOM, then bytes that are not UTF-8: read the rest as latin-1 without the BOM, so
                    # the first column keeps the name the header was decoded with
                    source = pa.OSFile(str(self.path))
                    source.seek(3)
                table = pacsv.read_csv(source, *self._options(cols, enc))
                self.encoding = enc
                break
            except (pa.ArrowException, OSError) as e:
                msg = str(e)
                if "UTF8" in msg and enc == "utf8":
                    continue
                if "Empty CSV file" in msg:
                    raise DataFormatError(self.path, "no data rows (only a header)" if self.header else
                                          "no data rows (only blank lines)") from None
                if _FIELDS_RE.search(msg):
                    self._fail_fields(msg)
                raise DataFormatError(self.path, f"cannot parse file: {msg}") from None
            finally:
                if isinstance(source, pa.NativeFile):
                    source.close()
        assert table is not None
        self.n = table.num_rows
        if self.n == 0:
            raise DataFormatError(
                self.path, "no data rows (only a header)" if self.header else "no data rows (only blank lines)"
            )
        self._data = {c: table.column(c) for c in cols}  # ChunkedArray: compute kernels take it as is

    def _starts_with_bom(self) -> bool:
        with open(self.path, "rb") as fh:
            return fh.read(3) == b"\xef\xbb\xbf"

    # -- locating lines (error path only) ------------------------------------------------------
    def _iter_records(self):
        """Yield (first line number, number of fields) for each non-blank record, header included."""
        if self.quoting:
            with open(self.path, newline="", encoding=self.encoding.replace("utf8", "utf-8-sig"),
                      errors="replace") as fh:
                reader = csv.reader(fh, delimiter=self.sep, quotechar='"', doublequote=True, strict=False)
                prev = 0
                try:
                    for rec in reader:
                        start, prev = prev + 1, reader.line_num
                        if rec:
                            yield start, len(rec)
                except csv.Error:
                    return
        else:
            sep = self.field_sep.encode("latin-1" if self.encoding == "latin-1" else "utf-8")
            with open(self.path, "rb") as fh:
                for i, raw in _physical_lines(fh):
                    if raw:
                        yield i, raw.count(sep) + 1

    def _fail_fields(self, arrow_msg: str) -> None:
        expected = self.n_fields or len(self.columns)
        for line, k in self._iter_records():
            if k != expected:
                hint = ""
                if k == 1:
                    hint = f"; is the file really {self.field_sep!r}-delimited?"
                elif k < expected:
                    hint = "; the line looks truncated"
                raise DataFormatError(
                    self.path,
                    f"expected {expected} {self.field_sep!r}-separated fields, found {k}{hint}",
                    line=line,
                )
        raise DataFormatError(self.path, f"wrong number of fields: {arrow_msg}")

    def row_labels(self, rows: np.ndarray) -> list[int]:
        need = int(rows.max()) + 1 + (1 if self.header else 0)
        if self._record_lines is None or len(self._record_lines) < need - int(self.header):
            lines: list[int] = []
            for line, _ in self._iter_records():
                lines.append(line)
                if len(lines) >= need:
                    break
            self._record_lines = lines[1:] if self.header else lines
        out = []
        for r in rows:
            r = int(r)
            out.append(self._record_lines[r] if r < len(self._record_lines) else r + 1 + int(self.header))
        return out


def _physical_lines(fh):
    """(1-based line number, content) of a binary file, with '\\n', '\\r\\n' and a lone '\\r' all ending a
    line, as pyarrow's CSV reader counts them."""
    number = 0
    for raw in fh:
        parts = raw.rstrip(b"\n").split(b"\r")
        if raw.endswith(b"\r\n") or (len(parts) > 1 and parts[-1] == b""):
            parts.pop()
        for part in parts or [b""]:
            number += 1
            yield number, part


class _ParquetSource(_Source):
    def __init__(self, path: Path):
        super().__init__(path)
        _check_file(path)
        try:
            self.columns = list(pq.read_schema(path).names)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for broken files
            raise DataFormatError(path, f"not a readable Parquet file (corrupt or truncated?): {e}") from None

    def read(self, cols: list[str]) -> None:
        cols = list(dict.fromkeys(cols))
        self.check_unique(cols)
        try:
            table = pq.read_table(self.path, columns=cols)
        except Exception as e:  # noqa: BLE001
            raise DataFormatError(self.path, f"cannot read Parquet data (corrupt or truncated?): {e}") from None
        self.n = table.num_rows
        if self.n == 0:
            raise DataFormatError(self.path, "no data rows")
        self._data = {}
        for c in cols:
            arr = table.column(c)
            try:
                arr = arr.combine_chunks()
            except Exception:  # noqa: BLE001 - e.g. > 2 GiB of strings
                arr = pa.concat_arrays([a.cast(pa.large_string()) for a in arr.chunks])
            if isinstance(arr, pa.ExtensionArray):
                arr = arr.storage
            if pa.types.is_dictionary(arr.type):
                arr = arr.dictionary_decode()
            self._data[c] = arr

    @property
    def row_word(self) -> str:
        return "row"

    def row_labels(self, rows: np.ndarray) -> list[int]:
        return [int(r) for r in rows]  # 0-based row positions


def _open_table(path: Path, sep: str | None) -> _Source:
    """A generic CSV/TSV/Parquet table."""
    if path.suffix.lower() in _PARQUET_SUFFIXES:
        return _ParquetSource(path)
    if sep is not None and (not isinstance(sep, str) or len(sep) != 1 or sep in '\r\n"\x00'):
        raise DataFormatError(path, f"data.sep must be a single character other than a quote, NUL or newline,"
                              f" got {sep!r}")
    if sep is None:
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
    return _TextSource(path, sep=sep, header=True, quoting=True)


# --------------------------------------------------------------------------------------------
# Column conversion
# --------------------------------------------------------------------------------------------


def _np_mask(arr: pa.Array) -> np.ndarray:
    return arr.fill_null(False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


def _null_or_blank(arr: pa.Array) -> np.ndarray:
    mask = _np_mask(arr.is_null())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        mask |= _np_mask(pc.equal(arr, "")) | _np_mask(pc.utf8_is_space(arr))
    return mask


def _to_pandas_str(arr: pa.Array) -> pd.Series:
    """pandas' default string dtype ('str' in pandas 3, object in pandas 2)."""
    return arr.to_pandas()


def _ids(src: _Source, col: str, canon: str, *, integer: bool = False) -> pd.Series:
    """An id column as strings exactly as written (Parquet integers become their decimal text)."""
    arr = src.col(col)
    t = arr.type
    if pa.types.is_floating(t):  # e.g. integer ids stored as float because of nulls: 196.0 -> '196'
        src.fail(col, f"missing {canon} (NaN)", _np_mask(pc.is_nan(arr)), arr)
        try:
            arr = pc.cast(pc.cast(arr, pa.int64()), pa.string())
        except pa.ArrowException:
            arr = pc.cast(arr, pa.string())
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        try:
            arr = pc.cast(arr, pa.string())
        except pa.ArrowException:
            raise DataFormatError(src.path, f"{canon} values are not valid UTF-8 text", column=col) from None
    elif not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        try:
            arr = pc.cast(arr, pa.string())
        except pa.ArrowException:
            raise DataFormatError(src.path, f"{canon} column has unsupported type {t}", column=col) from None
    src.fail(col, f"missing {canon} (null or empty)", _null_or_blank(arr), arr)
    if integer:
        ok = _np_mask(pc.match_substring_regex(arr, _DIGITS_RE))
        src.fail(col, f"{canon} is not an integer id", ~ok, arr)
    return _to_pandas_str(arr)


def _decimal_to_int64(texts: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact int64 from decimal strings like '881250949.0' or '8.8125e8' (via Decimal, never float).

    Returns (values, outside-int64 mask, non-integral mask); each distinct string is converted once.
    """
    uniq = pc.unique(texts)
    values = np.zeros(len(uniq), dtype=np.int64)
    nonint = np.zeros(len(uniq), dtype=bool)
    overflow = np.zeros(len(uniq), dtype=bool)
    for k, u in enumerate(uniq.to_pylist()):
        d = Decimal(u.strip())
        if d < _I64_MIN or d > _I64_MAX:
            overflow[k] = True
        elif d != d.to_integral_value():
            nonint[k] = True
        else:
            values[k] = int(d)
    idx = pc.index_in(texts, value_set=uniq).to_numpy(zero_copy_only=False)
    return values[idx], overflow[idx], nonint[idx]


_NS_PER = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}


def _coarsest_unit(ticks: np.ndarray, unit: str, extra: dict) -> np.ndarray:
    """Integer ticks of ``unit`` expressed in the coarsest of s/ms/us/ns that holds them exactly
    (never finer than ``unit``, so nothing is multiplied and nothing overflows)."""
    for u in ("s", "ms", "us", "ns"):
        f = _NS_PER[u] // _NS_PER[unit]
        if f >= 1 and (ticks % f == 0).all():
            extra["timestamp_unit"] = u
            return ticks // f
    raise AssertionError  # pragma: no cover - f == 1 always divides


def _iso_to_int64(src: _Source, col: str, texts: pa.Array, extra: dict) -> np.ndarray:
    try:
        dt = pd.to_datetime(texts.to_pandas(), utc=True, format="ISO8601")
        values = dt.dt.tz_localize(None).to_numpy()  # datetime64 in pandas' unit (ns, or us/s far from 1970)
        unit = np.datetime_data(values.dtype)[0]
        if unit not in _NS_PER:
            values, unit = values.astype("datetime64[s]"), "s"
        ticks = values.astype(np.int64)
    except (ValueError, TypeError, OverflowError) as e:  # OutOfBoundsDatetime is a ValueError
        raise DataFormatError(src.path, f"cannot parse date/time values: {e}", column=col) from None
    return _coarsest_unit(ticks, unit, extra)


def _timestamps(src: _Source, col: str, extra: dict, *, what: str = "timestamp") -> np.ndarray:
    """A timestamp (or order) column as exact int64."""
    arr = src.col(col)
    t = arr.type
    src.fail(col, f"missing {what} (null or empty)", _null_or_blank(arr), arr)
    if pa.types.is_integer(t):
        if pa.types.is_uint64(t):
            big = _np_mask(pc.greater(arr, pa.scalar(2**63 - 1, pa.uint64())))
            src.fail(col, f"{what} is outside the int64 range", big, arr)
        return arr.cast(pa.int64()).to_numpy(zero_copy_only=False)
    if pa.types.is_floating(t):
        vals = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        src.fail(col, f"{what} is not a finite number", ~np.isfinite(vals), arr)
        src.fail(col, f"{what} is outside the int64 range", (vals < -(2.0**63)) | (vals >= 2.0**63), arr)
        src.fail(col, f"{what} is not an integer", vals != np.floor(vals), arr)
        return vals.astype(np.int64)
    if pa.types.is_decimal(t):
        vals, overflow, nonint = _decimal_to_int64(pc.cast(arr, pa.string()))
        src.fail(col, f"{what} is outside the int64 range", overflow, arr)
        src.fail(col, f"{what} is not an integer", nonint, arr)
        return vals
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        # ticks in the column's own unit: far-away dates do not fit nanoseconds (year > 2262)
        if pa.types.is_timestamp(t):
            unit, ticks = t.unit, pc.cast(arr, pa.int64())
        elif pa.types.is_date32(t):
            unit, ticks = "s", pc.multiply(pc.cast(pc.cast(arr, pa.int32()), pa.int64()), 86400)
        else:
            unit, ticks = "ms", pc.cast(arr, pa.int64())
        return _coarsest_unit(ticks.to_numpy(zero_copy_only=False), unit, extra)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataFormatError(src.path, f"{what} column has unsupported type {t}", column=col)
    # Text. Fast path: plain integers.
    try:
        return pc.cast(arr, pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowException:
        pass
    texts = pc.utf8_trim_whitespace(arr)
    is_num = _np_mask(pc.match_substring_regex(texts, _NUM_RE))
    if not is_num.all():
        if what == "timestamp" and _np_mask(pc.match_substring_regex(texts, _ISO_RE)).all():
            return _iso_to_int64(src, col, texts, extra)
        src.fail(col, f"{what} is not a number", ~is_num, arr)
    is_int = _np_mask(pc.match_substring_regex(texts, _INT_RE))
    out = np.zeros(len(texts), dtype=np.int64)
    overflow = np.zeros(len(texts), dtype=bool)
    nonint = np.zeros(len(texts), dtype=bool)
    if is_int.any():
        ints = texts.filter(pa.array(is_int))
        try:
            out[is_int] = pc.cast(ints, pa.int64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:  # some integer is outside the int64 range
            out[is_int], overflow[is_int], _ = _decimal_to_int64(ints)
    rest = ~is_int
    if rest.any():
        out[rest], overflow[rest], nonint[rest] = _decimal_to_int64(texts.filter(pa.array(rest)))
    src.fail(col, f"{what} is outside the int64 range", overflow, arr)
    src.fail(col, f"{what} is not an integer", nonint, arr)
    return out


def _ratings(src: _Source, col: str) -> np.ndarray:
    """A rating column as float64; empty values become NaN (range checks belong to validation)."""
    arr = src.col(col)
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        # unsafe: an integer beyond 2**53 may round (the range check is validation's); never an exception
        return pc.cast(arr, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataFormatError(src.path, f"rating column has unsupported type {t}", column=col)
    texts = pc.utf8_trim_whitespace(arr)
    empty = _np_mask(pc.equal(texts, "")) | _np_mask(arr.is_null())
    if empty.any():
        texts = pc.if_else(pa.array(empty), pa.scalar(None, pa.string()), texts)
    try:
        return pc.cast(texts, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowException:
        pass
    ok = _np_mask(pc.match_substring_regex(texts, _NUM_RE)) | empty
    src.fail(col, "rating is not a number", ~ok, arr)
    vals = pd.to_numeric(pd.Series(texts.to_pylist(), dtype=object), errors="coerce")
    return vals.to_numpy(dtype=np.float64)


def _interactions(src: _Source, user: str, item: str, ts: str, rating: str | None, extra: dict, *,
                  integer_ids: bool = False, ts_is_order: bool = False, read: bool = True) -> pd.DataFrame:
    if read:
        src.read([c for c in (user, item, ts, rating) if c is not None])
    cols = {
        USER: _ids(src, user, USER, integer=integer_ids),
        ITEM: _ids(src, item, ITEM, integer=integer_ids),
        TS: _timestamps(src, ts, extra, what="order value" if ts_is_order else "timestamp"),
    }
    if rating is not None:
        cols[RATING] = _ratings(src, rating)
    df = pd.DataFrame({k: (v.reset_index(drop=True) if isinstance(v, pd.Series) else v) for k, v in cols.items()})
    df[TS] = df[TS].astype(np.int64)
    if RATING in df:
        df[RATING] = df[RATING].astype(np.float64)
    return df


# --------------------------------------------------------------------------------------------
# Catalogs
# --------------------------------------------------------------------------------------------


def _genre_tokens(obj: Any) -> list[str]:
    if obj is None:
        return []
    if isinstance(obj, (list, tuple, set, np.ndarray)):
        out: list[str] = []
        for x in obj:
            out.extend(_genre_tokens(x))
        return out
    s = str(obj).strip()
    return [s] if s else []


def _listlike_genre(value: Any) -> str | None:
    """'Beauty', 'Makeup' / ['a', 'b'] / a|b / Drama -> '|'-joined text (None when empty)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        toks = _genre_tokens(value)
        return "|".join(toks) if toks else None
    s = str(value).strip()
    if not s:
        return None
    if s[0] not in "['\"":
        return s
    # A CSV-quoted Python repr ("'A', ""B's"", 'C'") arrives wrapped in quotes with doubled quotes.
    if len(s) > 1 and s[0] == s[-1] == '"' and ("'" in s[1:-1] or '""' in s[1:-1]):
        s = s[1:-1].replace('""', '"').strip()
    inner = s[1:-1] if (s[0], s[-1]) == ("[", "]") else s
    try:
        parsed = ast.literal_eval("[" + inner + "]")
        toks = _genre_tokens(parsed)
        "|".join(toks).encode("utf-8")  # escapes such as '\\ud800' make text no file can hold
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeEncodeError):
        toks = [a or b for a, b in re.findall(r"'([^']*)'|\"([^\"]*)\"", s)] or s.strip("[]").split(",")
        toks = [t.strip().strip("'\"").strip() for t in toks]
        toks = [t for t in toks if t]
    return "|".join(toks) if toks else None


def _is_missing(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))


def _normalise_genres(values: pd.Series, mode: str) -> pd.Series:
    """Genres as '|'-joined text (None when missing). mode: 'space' (RecBole token_seq),
    'listlike' (Python-list-like text or list values) or 'pipe' (already '|'-separated)."""

    def conv(v: Any) -> str | None:
        if not isinstance(v, (list, tuple, np.ndarray)) and _is_missing(v):
            return None
        if mode == "space":
            out = "|".join(str(v).split())
        elif mode == "listlike":
            out = _listlike_genre(v)
        else:
            out = str(v).strip()
        return out or None

    obj = values.astype(object)
    cache: dict[Any, str | None] = {}
    out = []
    for v in obj:  # catalog-sized; unique values are converted once
        try:
            if v not in cache:
                cache[v] = conv(v)
            out.append(cache[v])
        except TypeError:  # unhashable (list values from Parquet)
            out.append(conv(v))
    return pd.Series(out, dtype=object)


def _catalog(src: _Source, item: str, title: str | None, genres: str | None, genre_mode: str, *,
             integer_ids: bool = False) -> pd.DataFrame:
    src.read([c for c in (item, title, genres) if c is not None])
    ids = _ids(src, item, ITEM, integer=integer_ids).reset_index(drop=True)
    n = len(ids)
    if title is not None:
        t = src.col(title).to_pandas().reset_index(drop=True)
    else:
        t = pd.Series([None] * n, dtype=object)
    if genres is not None:
        g = _normalise_genres(src.col(genres).to_pandas().reset_index(drop=True), genre_mode)
    else:
        g = pd.Series([None] * n, dtype=object)
    return _catalog_frame(ids, t, g)


def _catalog_frame(ids: pd.Series, titles: pd.Series, genres: pd.Series) -> pd.DataFrame:
    def text(col: pd.Series) -> pd.Series:
        vals = [None if _is_missing(v) or not str(v).strip() else str(v) for v in col.astype(object)]
        return pd.Series(vals)  # pandas' default string dtype; object when everything is missing

    return pd.DataFrame({ITEM: ids.reset_index(drop=True), TITLE: text(titles), GENRES: text(genres)})


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


def _as_dir(path: Path, marker: str) -> tuple[Path, Path]:
    """(directory, main file) for a format whose main file is ``marker``."""
    if not path.exists():
        raise DataFormatError(path, "no such file or directory")
    if path.is_file():
        return path.parent, path
    return path, path / marker


def _load_ml100k(path: Path) -> InteractionData:
    d, f = _as_dir(path, "u.data")
    extra: dict = {"interactions_file": str(f)}
    src = _TextSource(f, sep="\t", header=False, names=[USER, ITEM, RATING, TS])
    inter = _interactions(src, USER, ITEM, TS, RATING, extra, integer_ids=True)
    items = None
    if (d / "u.item").exists():
        names = list(ML100K_GENRES)
        if (d / "u.genre").exists():
            names = _read_ml100k_genres(d / "u.genre")
        items = _read_ml100k_items(d / "u.item", names)
        extra["items_file"] = str(d / "u.item")
    return InteractionData(inter, items, source=str(path), format="movielens-100k", extra=extra)


def _read_ml100k_genres(path: Path) -> list[str]:
    src = _TextSource(path, sep="|", header=False, names=["name", "index"])
    src.read(["name", "index"])
    names = src.col("name").to_pylist()
    idx = _timestamps(src, "index", {}, what="genre index")
    order = np.argsort(idx, kind="stable")
    if not np.array_equal(idx[order], np.arange(len(idx))):
        raise DataFormatError(path, f"genre indices should be 0..{len(idx) - 1}, found {sorted(idx.tolist())}")
    return [names[k] for k in order]


def _read_ml100k_items(path: Path, genre_names: list[str]) -> pd.DataFrame:
    flag_cols = [f"g{k}" for k in range(len(genre_names))]
    cols = [ITEM, TITLE, "release_date", "video_release_date", "imdb_url", *flag_cols]
    src = _TextSource(path, sep="|", header=False, names=cols)
    src.read([ITEM, TITLE, *flag_cols])
    ids = _ids(src, ITEM, ITEM, integer=True)
    flags = np.zeros((src.n, len(flag_cols)), dtype=bool)
    for k, c in enumerate(flag_cols):
        arr = src.col(c)
        one = _np_mask(pc.equal(arr, "1"))
        src.fail(c, f"genre flag for {genre_names[k]!r} must be 0 or 1", ~(one | _np_mask(pc.equal(arr, "0"))), arr)
        flags[:, k] = one
    g = pd.Series([""] * src.n, dtype=object)
    for k, name in enumerate(genre_names):
        m = flags[:, k]
        if m.any():
            g[m] = g[m] + "|" + name
    g = g.str.slice(1).where(flags.any(axis=1), None)
    return _catalog_frame(ids, src.col(TITLE).to_pandas(), g)


def _load_ml_dat(path: Path) -> InteractionData:
    d, f = _as_dir(path, "ratings.dat")
    extra: dict = {"interactions_file": str(f)}
    names = [USER, "_s1", ITEM, "_s2", RATING, "_s3", TS]
    src = _TextSource(f, sep=":", header=False, names=names, field_sep="::", n_fields=4)
    src.read(names)
    for c in ("_s1", "_s2", "_s3"):  # ':' splitting leaves an empty field between the two colons
        arr = src.col(c)
        src.fail(c, "malformed '::' separator (single ':' inside a field?)", ~_np_mask(pc.equal(arr, "")), arr)
    inter = _interactions(src, USER, ITEM, TS, RATING, extra, integer_ids=True, read=False)
    items = None
    if (d / "movies.dat").exists():
        items = _read_movies_dat(d / "movies.dat")
        extra["items_file"] = str(d / "movies.dat")
    return InteractionData(inter, items, source=str(path), format="movielens-dat", extra=extra)


def _read_movies_dat(path: Path) -> pd.DataFrame:
    _check_file(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = pd.Series(text.split("\n"), dtype=object).str.rstrip("\r")
    line_no = np.arange(1, len(lines) + 1)
    keep = (lines.str.len() > 0).to_numpy()
    lines, line_no = lines[keep].reset_index(drop=True), line_no[keep]
    if len(lines) == 0:
        raise DataFormatError(path, "no data rows (only blank lines)")
    parts = lines.str.split("::", n=2, expand=True)
    if parts.shape[1] < 3 or parts[2].isna().any():
        bad = np.flatnonzero(parts[2].isna().to_numpy()) if parts.shape[1] >= 3 else np.arange(len(lines))
        k = int(bad[0])
        found = len(lines[k].split("::"))
        raise DataFormatError(path, f"expected 3 '::'-separated fields (MovieID::Title::Genres), found {found}",
                              line=int(line_no[k]), rows=[int(line_no[j]) for j in bad[:20]])
    ids = parts[0]
    bad = ~ids.str.fullmatch(r"[0-9]+").to_numpy(dtype=bool)
    if bad.any():
        rows = [int(line_no[j]) for j in np.flatnonzero(bad)[:20]]
        raise DataFormatError(path, f"item_id is not an integer id, e.g. {_short(ids[np.flatnonzero(bad)[0]])}",
                              line=rows[0], column=ITEM, rows=rows)
    genres = parts[2].where(parts[2].str.len() > 0, None)
    return _catalog_frame(ids.astype(str), parts[1], genres)


def _load_ml_csv(path: Path) -> InteractionData:
    d, f = _as_dir(path, "ratings.csv")
    extra: dict = {"interactions_file": str(f)}
    src = _TextSource(f, sep=",", header=True, quoting=True)
    for c, role in (("userId", USER), ("movieId", ITEM), ("rating", RATING), ("timestamp", TS)):
        src.require(c, role, _delimiter_hint(src))
    inter = _interactions(src, "userId", "movieId", "timestamp", "rating", extra, integer_ids=True)
    items = None
    if (d / "movies.csv").exists():
        isrc = _TextSource(d / "movies.csv", sep=",", header=True, quoting=True)
        for c, role in (("movieId", ITEM), ("title", TITLE), ("genres", GENRES)):
            isrc.require(c, role, _delimiter_hint(isrc))
        items = _catalog(isrc, "movieId", "title", "genres", "pipe", integer_ids=True)
        extra["items_file"] = str(d / "movies.csv")
    return InteractionData(inter, items, source=str(path), format="movielens-csv", extra=extra)


def _delimiter_hint(src: _Source) -> str:
    if isinstance(src, _TextSource) and len(src.columns) == 1:
        for cand in (",", ";", "\t", "|", "::"):
            if cand != src.sep and cand in src.columns[0]:
                return f" (the header looks {cand!r}-delimited, but {src.sep!r} was expected)"
    return ""


def _recbole_field(src: _Source, name: str | None) -> str | None:
    """Source column for a RecBole field name ('user_id' or 'user_id:token')."""
    if name is None:
        return None
    if name in src.columns:
        return name
    for c in src.columns:
        if c.split(":", 1)[0] == name:
            return c
    return None


def _load_recbole(path: Path, *, interactions_file=None, columns=None, order_column=None) -> InteractionData:
    if not path.exists():
        raise DataFormatError(path, "no such file or directory")
    if interactions_file:
        f = _spec_file(path if path.is_dir() else path.parent, interactions_file, "data.interactions_file")
    elif path.is_file():
        f = path
    else:
        found = sorted(path.glob("*.inter"))
        if not found:
            raise DataFormatError(path, "no RecBole '*.inter' file in this directory")
        if len(found) > 1:
            same = [p for p in found if p.stem == path.name]
            if len(same) != 1:
                raise DataFormatError(path, "several '.inter' files; choose one with interactions_file: "
                                      + ", ".join(p.name for p in found))
            found = same
        f = found[0]
    extra: dict = {"interactions_file": str(f)}
    src = _TextSource(f, sep="\t", header=True)
    columns = dict(columns or {})
    cols: dict[str, str | None] = {}
    for canon in (USER, ITEM, TS, RATING):
        want = columns.get(canon, canon)
        cols[canon] = _recbole_field(src, want)
        if cols[canon] is None and canon in columns:
            src.require(want, f"mapped to {canon}")
    ts_is_order = False
    if order_column and (cols[TS] is None or TS not in columns):
        cols[TS] = _recbole_field(src, order_column)
        if cols[TS] is None:
            src.require(order_column, "order_column")
        ts_is_order = True
    for canon in (USER, ITEM, TS):
        if cols[canon] is None:
            src.require(f"{canon}:<type>", canon, _delimiter_hint(src) or
                        (" (set data.order_column when there is no timestamp)" if canon == TS else ""))
    extra["columns"] = {k: v for k, v in cols.items() if v is not None}
    if ts_is_order:
        extra["timestamp_is_order"] = True
    inter = _interactions(src, cols[USER], cols[ITEM], cols[TS], cols[RATING], extra, ts_is_order=ts_is_order)
    items = None
    item_file = f.with_suffix(".item")
    if item_file.exists():
        isrc = _TextSource(item_file, sep="\t", header=True)
        iid = _recbole_field(isrc, cols[ITEM].split(":", 1)[0]) or _recbole_field(isrc, ITEM)
        if iid is None:
            isrc.require(f"{ITEM}:<type>", ITEM, _delimiter_hint(isrc))
        title = next((c for c in (_recbole_field(isrc, n) for n in ("movie_title", "title", "name")) if c), None)
        genre = next((c for c in (_recbole_field(isrc, n) for n in ("class", "genre", "genres", "categories"))
                      if c), None)
        mode = "space" if genre is not None and genre.endswith(":token_seq") else "listlike"
        items = _catalog(isrc, iid, title, genre, mode)
        extra["items_file"] = str(item_file)
    return InteractionData(inter, items, source=str(path), format="recbole", extra=extra)


def _spec_file(base: Path, rel: str, key: str) -> Path:
    """A file named in the data spec: relative to the data directory and inside it."""
    try:
        resolve_inside(base, rel, key)
    except PathContainmentError as e:
        raise DataFormatError(base, str(e)) from None
    return base / rel


def _find_table(d: Path, word: str) -> list[Path]:
    return sorted(p for p in d.iterdir()
                  if p.is_file() and word in p.name.lower() and p.suffix.lower() in _TABLE_SUFFIXES)


def _pick(src: _Source, explicit: str | None, candidates: tuple[str, ...], role: str) -> str | None:
    if explicit is not None:
        src.require(explicit, role, _delimiter_hint(src))
        return explicit
    return next((c for c in candidates if c in src.columns), None)


def _load_generic(path: Path, *, interactions_file=None, columns=None, order_column=None, items_file=None,
                  item_columns=None, sep=None) -> InteractionData:
    if not path.exists():
        raise DataFormatError(path, "no such file or directory")
    base = path if path.is_dir() else path.parent
    auto = False
    if interactions_file:
        f = _spec_file(base, interactions_file, "data.interactions_file")
    elif path.is_file():
        f = path
    else:
        found = _find_table(path, "interactions")
        if not found:
            tables = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _TABLE_SUFFIXES)
            if len(tables) != 1:
                raise DataFormatError(path, "no '*interactions*.csv|parquet' file (set data.interactions_file)")
            found = tables
        if len(found) > 1:
            raise DataFormatError(path, "several interactions files; choose one with interactions_file: "
                                  + ", ".join(p.name for p in found))
        f, auto = found[0], True
    extra: dict = {"interactions_file": str(f)}
    columns = dict(columns or {})
    unknown = set(columns) - {USER, ITEM, TS, RATING}
    if unknown:
        raise DataFormatError(f, f"unknown canonical column(s) in the mapping: {sorted(unknown)}; "
                              f"expected keys among {[USER, ITEM, TS, RATING]}")
    src = _open_table(f, sep)
    hint = _delimiter_hint(src)
    user = _pick(src, columns.get(USER), _USER_NAMES, f"mapped to {USER}")
    item = _pick(src, columns.get(ITEM), _ITEM_NAMES, f"mapped to {ITEM}")
    ts = _pick(src, columns.get(TS), (), f"mapped to {TS}")
    ts_is_order = False
    if ts is None and order_column:
        ts = _pick(src, order_column, (), "order_column")
        ts_is_order = True
    if ts is None:
        ts = _pick(src, None, _TS_NAMES, TS)
    if ts is None:
        ts = _pick(src, None, _ORDER_NAMES, TS)
        ts_is_order = ts is not None
    rating = _pick(src, columns.get(RATING), _RATING_NAMES, f"mapped to {RATING}")
    avail = ", ".join(repr(c) for c in src.columns)
    for canon, got, looked in ((USER, user, _USER_NAMES), (ITEM, item, _ITEM_NAMES),
                               (TS, ts, _TS_NAMES + _ORDER_NAMES)):
        if got is None:
            extra_hint = " or data.order_column" if canon == TS else ""
            raise DataFormatError(
                f, f"no {canon} column: looked for {', '.join(looked)}; set data.columns.{canon}{extra_hint}; "
                   f"available columns: [{avail}]{hint}")
    extra["columns"] = {k: v for k, v in {USER: user, ITEM: item, TS: ts, RATING: rating}.items() if v}
    if ts_is_order:
        extra["timestamp_is_order"] = True
    inter = _interactions(src, user, item, ts, rating, extra, ts_is_order=ts_is_order)

    items = None
    item_path = None
    if items_file:
        item_path = _spec_file(base, items_file, "data.items_file")
    elif auto:
        cands = [p for p in _find_table(path, "items") if p != f]
        if len(cands) > 1:
            raise DataFormatError(path, "several item catalog files; choose one with items_file: "
                                  + ", ".join(p.name for p in cands))
        item_path = cands[0] if cands else None
    if item_path is not None:
        item_columns = dict(item_columns or {})
        unknown = set(item_columns) - {ITEM, TITLE, GENRES}
        if unknown:
            raise DataFormatError(item_path, f"unknown catalog column(s) in the mapping: {sorted(unknown)}; "
                                  f"expected keys among {[ITEM, TITLE, GENRES]}")
        isrc = _open_table(item_path, sep)
        iid = _pick(isrc, item_columns.get(ITEM), (item,) + _ITEM_NAMES, f"mapped to {ITEM}")
        if iid is None:
            raise DataFormatError(item_path, f"no {ITEM} column: looked for {', '.join((item,) + _ITEM_NAMES)}; "
                                  f"set data.item_columns.{ITEM}; available columns: {isrc.columns}"
                                  + _delimiter_hint(isrc))
        title = _pick(isrc, item_columns.get(TITLE), _TITLE_NAMES, f"mapped to {TITLE}")
        genre = _pick(isrc, item_columns.get(GENRES), _GENRE_NAMES, f"mapped to {GENRES}")
        items = _catalog(isrc, iid, title, genre, "listlike")
        extra["items_file"] = str(item_path)
        extra["item_columns"] = {k: v for k, v in {ITEM: iid, TITLE: title, GENRES: genre}.items() if v}
    return InteractionData(inter, items, source=str(path), format="generic", extra=extra)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


_EXPECTED = ("u.data (movielens-100k), ratings.dat (movielens-dat), ratings.csv (movielens-csv), "
             "*.inter (recbole), or a *interactions*.csv|parquet file (generic)")


def detect_format(path: Path) -> str:
    """The format of a data directory (or file), judged from the file names."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, f"no such file or directory (expected a data directory with {_EXPECTED})")
    if path.is_file():
        name, suffix = path.name, path.suffix.lower()
        if name == "u.data":
            return "movielens-100k"
        if name == "ratings.dat":
            return "movielens-dat"
        if name == "ratings.csv":
            return "movielens-csv"
        if suffix == ".inter":
            return "recbole"
        if suffix in _TABLE_SUFFIXES:
            return "generic"
        raise DataFormatError(path, f"cannot tell the format of this file; expected {_EXPECTED}")
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as e:
        raise DataFormatError(path, f"cannot list directory: {e}") from None
    if "u.data" in entries:
        return "movielens-100k"
    if "ratings.dat" in entries:
        return "movielens-dat"
    if "ratings.csv" in entries:
        return "movielens-csv"
    if any(e.endswith(".inter") for e in entries):
        return "recbole"
    if _find_table(path, "interactions"):
        return "generic"
    tables = [e for e in entries if Path(e).suffix.lower() in _TABLE_SUFFIXES and (path / e).is_file()]
    if len(tables) == 1:
        return "generic"
    shown = ", ".join(entries[:15]) + (", ..." if len(entries) > 15 else "") if entries else "nothing"
    raise DataFormatError(path, f"cannot detect the data format: found {shown}; expected {_EXPECTED}")


def load_dataset(path: str | Path, format: str = "auto", *, interactions_file: str | None = None,
                 columns: dict[str, str] | None = None, order_column: str | None = None,
                 items_file: str | None = None, item_columns: dict[str, str] | None = None,
                 sep: str | None = None) -> InteractionData:
    """Load a dataset into canonical tables. See the module docstring for the formats."""
    path = Path(path)
    try:
        base = path if path.is_dir() else path.parent
        root = base.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # name too long, NUL byte, symlink loop
        raise DataFormatError(path, f"cannot access data path: {e}") from None
    token = _DATA_DIR.set(root)
    try:
        return _load(path, format, interactions_file=interactions_file, columns=columns, order_column=order_column,
                     items_file=items_file, item_columns=item_columns, sep=sep)
    finally:
        _DATA_DIR.reset(token)


def _load(path: Path, format: str, *, interactions_file, columns, order_column, items_file, item_columns,
          sep) -> InteractionData:
    fmt = format
    if fmt == "auto":
        if interactions_file and path.is_dir():
            fmt = detect_format(_spec_file(path, interactions_file, "data.interactions_file"))
        else:
            fmt = detect_format(path)
    if fmt == "movielens-100k":
        return _load_ml100k(path)
    if fmt == "movielens-dat":
        return _load_ml_dat(path)
    if fmt == "movielens-csv":
        return _load_ml_csv(path)
    if fmt == "recbole":
        return _load_recbole(path, interactions_file=interactions_file, columns=columns, order_column=order_column)
    if fmt == "generic":
        return _load_generic(path, interactions_file=interactions_file, columns=columns,
                             order_column=order_column, items_file=items_file, item_columns=item_columns, sep=sep)
    raise DataFormatError(path, f"unknown format {format!r}; expected 'auto' or one of {', '.join(FORMATS)}")


def load_from_config(data_cfg: DataConfig) -> InteractionData:
    """Load the dataset described by the ``data`` section of the configuration."""
    if data_cfg.source == "simulator":
        raise DataFormatError("simulator", "data.source is 'simulator': generate data with asft.simulator; "
                              "load_from_config only reads files")
    try:  # checked again here: the environment (ASFT_DATA_ROOTS) may have changed since validation
        require_data_root(data_cfg.source, "data.source")
    except PathContainmentError as e:
        raise DataFormatError(data_cfg.source, str(e)) from None
    return load_dataset(
        data_cfg.source,
        data_cfg.format,
        interactions_file=data_cfg.interactions_file,
        columns=data_cfg.columns or None,
        order_column=data_cfg.order_column,
        items_file=data_cfg.items_file,
        item_columns=data_cfg.item_columns or None,
        sep=data_cfg.sep,
    )
