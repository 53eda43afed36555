"""Tests for asft.data.loaders: every format on tiny fixtures, auto-detection, and malformed input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asft.config import DataConfig
from asft.data.loaders import ML100K_GENRES, detect_format, load_dataset, load_from_config
from asft.data.schema import DataFormatError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def assert_canonical(df: pd.DataFrame, rating: bool) -> None:
    expected = ["user_id", "item_id", "timestamp"] + (["rating"] if rating else [])
    assert list(df.columns) == expected
    assert pd.api.types.is_string_dtype(df["user_id"])
    assert pd.api.types.is_string_dtype(df["item_id"])
    assert df["timestamp"].dtype == np.int64
    if rating:
        assert df["rating"].dtype == np.float64
    assert isinstance(df.index, pd.RangeIndex) and df.index.start == 0


def genres_row(flags: list[str]) -> str:
    bits = ["1" if g in flags else "0" for g in ML100K_GENRES]
    return "|".join(bits)


# ----------------------------------------------------------------------------------------------
# Fixtures: one tiny valid dataset per format
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def ml100k(tmp_path: Path) -> Path:
    d = tmp_path / "ml100k"
    kids = genres_row(["Children's", "Comedy"])
    write(d / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n196\t377\t5\t881250949\n")
    write(
        d / "u.item",
        f"242|Kolya (1996)|24-Jan-1997||http://x|{genres_row(['Comedy'])}\n"
        f"302|L.A. Confidential (1997)|01-Jan-1997||http://x|{genres_row(['Crime', 'Film-Noir', 'Mystery'])}\n"
        f"377|Heavyweights (1994)|01-Jan-1994||http://x|{kids}\n"
        f"400|Caf\xe9 (1995)|01-Jan-1995||http://x|{genres_row([])}\n",
        encoding="latin-1",
    )
    return d


@pytest.fixture
def mldat(tmp_path: Path) -> Path:
    d = tmp_path / "ml1m"
    write(d / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    write(d / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                            "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                            "3::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi\n"
                            "4::Caf\xe9 Society (1995)::Drama\n", encoding="latin-1")
    return d


@pytest.fixture
def mlcsv(tmp_path: Path) -> Path:
    d = tmp_path / "mlcsv"
    write(d / "ratings.csv", "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n"
                             "2,31,4.5,1260759185\n")
    write(d / "movies.csv", 'movieId,title,genres\n31,Dangerous Minds (1995),Drama\n'
                            '1029,"Dumbo, the Elephant (1941)",Animation|Children|Drama|Musical\n')
    return d


@pytest.fixture
def recbole(tmp_path: Path) -> Path:
    d = tmp_path / "ml-100k"
    write(d / "ml-100k.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                               "196\t242\t3\t881250949\n186\t302\t3\t8.8125e8\n22\t377\t1.5\t878887116.0\n")
    write(d / "ml-100k.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                              "242\tKolya\t1996\tComedy\n302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery\n"
                              "377\tHeavyweights\t1994\tChildren's Comedy\n")
    return d


@pytest.fixture
def beauty(tmp_path: Path) -> Path:
    d = tmp_path / "beauty"
    write(d / "beauty_interactions.csv", "user_idx,user_id,item_idx,asin,seq_pos\n"
                                         "1,A1YJ,1,B004756YJA,0\n1,A1YJ,2,B004ZT0SSG,1\n2,A2ZZ,1,B004756YJA,0\n"
                                         "2,A2ZZ,3,0000031852,1\n")
    write(d / "beauty_items.csv",
          "item_idx,asin,title,sales_type,sales_rank,categories,price,brand\n"
          "1,B004756YJA,\"OPI Nail Lacquer, Simmer\",Beauty,344222.0,\"'Beauty', 'Makeup', 'Nails'\",12.0,OPI\n"
          "2,B004ZT0SSG,Shatter,Beauty,1.0,\"\"\"'Beauty', 'Fragrance', \"\"\"\"Women's\"\"\"\", 'Eau'\"\"\",3.0,X\n"
          "3,0000031852,,Beauty,,,,\n")
    return d


# ----------------------------------------------------------------------------------------------
# Valid data
# ----------------------------------------------------------------------------------------------


def test_movielens_100k(ml100k: Path):
    data = load_dataset(ml100k)
    assert data.format == "movielens-100k"
    df = data.interactions
    assert_canonical(df, rating=True)
    assert df["user_id"].tolist() == ["196", "186", "22", "196"]
    assert df["item_id"].tolist() == ["242", "302", "377", "377"]
    assert df["timestamp"].tolist() == [881250949, 891717742, 878887116, 881250949]
    assert df["rating"].tolist() == [3.0, 3.0, 1.0, 5.0]
    items = data.items.set_index("item_id")
    assert items.loc["242", "title"] == "Kolya (1996)"
    assert items.loc["302", "genres"] == "Crime|Film-Noir|Mystery"
    assert items.loc["377", "genres"] == "Children's|Comedy"
    assert items.loc["400", "title"] == "Café (1995)"  # latin-1
    assert pd.isna(items.loc["400", "genres"])


def test_movielens_100k_genre_file(ml100k: Path):
    write(ml100k / "u.genre", "".join(f"{g}|{k}\n" for k, g in enumerate(ML100K_GENRES)).replace("Comedy", "Fun") + "\n")
    items = load_dataset(ml100k).items.set_index("item_id")
    assert items.loc["377", "genres"] == "Children's|Fun"


def test_movielens_dat(mldat: Path):
    data = load_dataset(mldat)
    assert data.format == "movielens-dat"
    df = data.interactions
    assert_canonical(df, rating=True)
    assert df.values.tolist() == [["1", "1193", 978300760, 5.0], ["1", "661", 978302109, 3.0],
                                  ["2", "1193", 978298413, 4.0]]
    items = data.items.set_index("item_id")
    assert items.loc["661", "genres"] == "Animation|Children's|Musical"
    assert items.loc["3", "title"] == "Star Wars: Episode IV - A New Hope (1977)"
    assert items.loc["4", "title"] == "Café Society (1995)"


def test_movielens_csv(mlcsv: Path):
    data = load_dataset(mlcsv)
    assert data.format == "movielens-csv"
    df = data.interactions
    assert_canonical(df, rating=True)
    assert df["user_id"].tolist() == ["1", "1", "2"]
    assert df["item_id"].tolist() == ["31", "1029", "31"]
    assert df["rating"].tolist() == [2.5, 3.0, 4.5]
    assert df["timestamp"].tolist() == [1260759144, 1260759179, 1260759185]
    items = data.items.set_index("item_id")
    assert items.loc["1029", "title"] == "Dumbo, the Elephant (1941)"
    assert items.loc["1029", "genres"] == "Animation|Children|Drama|Musical"


def test_recbole(recbole: Path):
    data = load_dataset(recbole)
    assert data.format == "recbole"
    df = data.interactions
    assert_canonical(df, rating=True)
    assert df["user_id"].tolist() == ["196", "186", "22"]
    assert df["timestamp"].tolist() == [881250949, 881250000, 878887116]  # 8.8125e8 exactly
    assert df["rating"].tolist() == [3.0, 3.0, 1.5]
    items = data.items.set_index("item_id")
    assert items.loc["302", "title"] == "L.A. Confidential"
    assert items.loc["302", "genres"] == "Crime|Film-Noir|Mystery"
    assert items.loc["377", "genres"] == "Children's|Comedy"


def test_recbole_single_file(recbole: Path):
    data = load_dataset(recbole / "ml-100k.inter")
    assert len(data.interactions) == 3 and data.items is not None


def test_generic_inferred_beauty_layout(beauty: Path):
    data = load_dataset(beauty)
    assert data.format == "generic"
    df = data.interactions
    assert_canonical(df, rating=False)
    assert df["user_id"].tolist() == ["A1YJ", "A1YJ", "A2ZZ", "A2ZZ"]
    assert df["item_id"].tolist() == ["B004756YJA", "B004ZT0SSG", "B004756YJA", "0000031852"]  # leading zeros kept
    assert df["timestamp"].tolist() == [0, 1, 0, 1]
    assert data.extra["timestamp_is_order"] is True
    items = data.items.set_index("item_id")
    assert items.loc["B004756YJA", "genres"] == "Beauty|Makeup|Nails"
    assert items.loc["B004756YJA", "title"] == "OPI Nail Lacquer, Simmer"
    assert items.loc["B004ZT0SSG", "genres"] == "Beauty|Fragrance|Women's|Eau"
    assert pd.isna(items.loc["0000031852", "genres"]) and pd.isna(items.loc["0000031852", "title"])


def test_generic_explicit_mapping_parquet(tmp_path: Path):
    f = tmp_path / "log.parquet"
    pq.write_table(pa.table({"u": [3, 1, 2], "i": ["x", "y", "x"], "t": [1700000000123, 5, 5],
                             "stars": [4.0, None, 1.0]}), f)
    data = load_dataset(f, "generic", columns={"user_id": "u", "item_id": "i", "timestamp": "t", "rating": "stars"})
    df = data.interactions
    assert_canonical(df, rating=True)
    assert df["user_id"].tolist() == ["3", "1", "2"]
    assert df["timestamp"].tolist() == [1700000000123, 5, 5]
    assert np.isnan(df["rating"][1])


def test_generic_order_column_and_items_file(tmp_path: Path):
    write(tmp_path / "events.csv", "who;what;step\nu1;a;2\nu1;b;1\n")
    write(tmp_path / "cat.csv", "what;name;tags\na;Alpha;\"['x', 'y']\"\nb;Beta;z\n")
    data = load_dataset(tmp_path, "generic", interactions_file="events.csv", sep=";",
                        columns={"user_id": "who", "item_id": "what"}, order_column="step",
                        items_file="cat.csv", item_columns={"item_id": "what", "title": "name", "genres": "tags"})
    assert data.interactions["timestamp"].tolist() == [2, 1]  # file order kept, not sorted
    assert data.items["genres"].tolist() == ["x|y", "z"]


def test_load_from_config(mlcsv: Path):
    data = load_from_config(DataConfig(source=str(mlcsv)))
    assert data.format == "movielens-csv" and len(data.interactions) == 3
    with pytest.raises(DataFormatError, match="simulator"):
        load_from_config(DataConfig())


def test_large_millisecond_timestamp_exact(tmp_path: Path):
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu,i,1700000000123\nu,j,9007199254740993\n")
    df = load_dataset(tmp_path).interactions
    assert df["timestamp"].dtype == np.int64
    assert df["timestamp"].tolist() == [1700000000123, 9007199254740993]  # 2**53 + 1: not float-safe


def test_float_timestamps_exact(tmp_path: Path):
    write(tmp_path / "interactions.csv",
          "user_id,item_id,timestamp\nu,i,8.8125e8\nu,j,881250949.0\nu,k,1.700000000123E12\nu,l, 42 \n")
    df = load_dataset(tmp_path).interactions
    assert df["timestamp"].tolist() == [881250000, 881250949, 1700000000123, 42]


def test_iso_datetime_timestamps(tmp_path: Path):
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu,i,1970-01-02T00:00:00Z\nu,j,1970-01-01\n")
    data = load_dataset(tmp_path)
    assert data.interactions["timestamp"].tolist() == [86400, 0]


def test_blank_lines_and_crlf(tmp_path: Path):
    write(tmp_path / "u.data", "1\t2\t3\t4\r\n\r\n5\t6\t7\t8\r\n")
    df = load_dataset(tmp_path).interactions
    assert df["user_id"].tolist() == ["1", "5"] and df["timestamp"].tolist() == [4, 8]


def test_utf8_bom_header(tmp_path: Path):
    write(tmp_path / "interactions.csv", "\ufeffuser_id,item_id,timestamp\nu,i,1\n")
    assert load_dataset(tmp_path).interactions["user_id"].tolist() == ["u"]


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: write(d / "u.data", "1\t2\t3\t4\n"), "movielens-100k"),
        (lambda d: write(d / "ratings.dat", "1::2::3::4\n"), "movielens-dat"),
        (lambda d: write(d / "ratings.csv", "userId\n"), "movielens-csv"),
        (lambda d: write(d / "x.inter", "user_id:token\n"), "recbole"),
        (lambda d: write(d / "my_interactions.parquet", "x"), "generic"),
        (lambda d: write(d / "log.csv", "x"), "generic"),
    ],
)
def test_detect_format(tmp_path: Path, setup, expected):
    setup(tmp_path)
    assert detect_format(tmp_path) == expected


def test_detect_format_file(tmp_path: Path):
    assert detect_format(write(tmp_path / "data.csv", "a\n")) == "generic"
    assert detect_format(write(tmp_path / "a.inter", "a\n")) == "recbole"


def test_real_ml100k_layout_detected_as_recbole(recbole: Path):
    assert detect_format(recbole) == "recbole"


# ----------------------------------------------------------------------------------------------
# Malformed input: DataFormatError naming the file and the line/column
# ----------------------------------------------------------------------------------------------


def raises(path, *args, **kwargs) -> DataFormatError:
    with pytest.raises(DataFormatError) as ei:
        load_dataset(path, *args, **kwargs)
    return ei.value


def test_truncated_last_line(tmp_path: Path):
    write(tmp_path / "u.data", "1\t2\t3\t4\n5\t6\t7\t8\n9\t10\t3")
    e = raises(tmp_path)
    assert "u.data" in str(e) and "line 3" in str(e) and e.line == 3
    assert "found 3" in str(e)


def test_truncated_last_line_csv_with_header(tmp_path: Path):
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n5,6,7,8\n9,10")
    e = raises(tmp_path)
    assert "ratings.csv" in str(e) and e.line == 4 and "line 4" in str(e)


def test_truncated_dat_line(tmp_path: Path):
    write(tmp_path / "ratings.dat", "1::2::3::4\n1::2::3\n")
    e = raises(tmp_path)
    assert "ratings.dat" in str(e) and "line 2" in str(e) and "'::'" in str(e)


def test_wrong_delimiter_headerless(tmp_path: Path):
    write(tmp_path / "u.data", "1,2,3,4\n5,6,7,8\n")
    e = raises(tmp_path)
    assert "u.data" in str(e) and "line 1" in str(e) and "delimited" in str(e)


def test_wrong_delimiter_with_header(tmp_path: Path):
    write(tmp_path / "interactions.csv", "user_id;item_id;timestamp\nu;i;1\n")
    e = raises(tmp_path)
    assert "interactions.csv" in str(e) and "';'" in str(e) and "user_id;item_id;timestamp" in str(e)


def test_text_in_id_column(tmp_path: Path):
    write(tmp_path / "u.data", "1\t2\t3\t4\nabc\t6\t7\t8\n9\t10\t3\t5\n")
    e = raises(tmp_path)
    assert "u.data" in str(e) and "line 2" in str(e) and "'user_id'" in str(e) and "'abc'" in str(e)
    assert e.column == "user_id" and e.rows == [2]


def test_text_in_timestamp(tmp_path: Path):
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n\n5,6,7,oops\n5,6,7,8\n5,6,7,x\n")
    e = raises(tmp_path)
    # the blank line counts: the bad rows are on lines 4 and 6
    assert "ratings.csv" in str(e) and "'timestamp'" in str(e) and e.line == 4 and e.rows == [4, 6]


def test_text_in_rating(tmp_path: Path):
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,good,4\n")
    e = raises(tmp_path)
    assert "'rating'" in str(e) and "line 2" in str(e)


def test_null_user_id(tmp_path: Path):
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu,i,1\n,j,2\n")
    e = raises(tmp_path)
    assert "interactions.csv" in str(e) and "'user_id'" in str(e) and "line 3" in str(e) and "missing" in str(e)


def test_null_in_parquet(tmp_path: Path):
    f = tmp_path / "interactions.parquet"
    pq.write_table(pa.table({"user_id": ["a", None, "c"], "item_id": ["x", "y", "z"], "timestamp": [1, 2, 3]}), f)
    e = raises(tmp_path)
    assert "interactions.parquet" in str(e) and "'user_id'" in str(e) and e.rows == [1]


def test_empty_file(tmp_path: Path):
    write(tmp_path / "u.data", "")
    e = raises(tmp_path)
    assert "u.data" in str(e) and "empty" in str(e)


def test_header_only(tmp_path: Path):
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n")
    e = raises(tmp_path)
    assert "ratings.csv" in str(e) and "no data rows" in str(e)


def test_missing_mapped_column(beauty: Path):
    e = raises(beauty, "generic", columns={"user_id": "user_id", "item_id": "product"})
    assert "beauty_interactions.csv" in str(e) and "'product'" in str(e) and "'asin'" in str(e)
    assert e.column == "product"


def test_missing_item_column_inferred(tmp_path: Path):
    write(tmp_path / "interactions.csv", "user_id,thing,timestamp\nu,i,1\n")
    e = raises(tmp_path)
    assert "interactions.csv" in str(e) and "item_id" in str(e) and "'thing'" in str(e)


def test_corrupt_parquet(tmp_path: Path):
    f = tmp_path / "interactions.parquet"
    pq.write_table(pa.table({"user_id": ["a"] * 100, "item_id": ["x"] * 100, "timestamp": list(range(100))}), f)
    f.write_bytes(f.read_bytes()[:-30])  # truncated
    e = raises(tmp_path)
    assert "interactions.parquet" in str(e) and "Parquet" in str(e)


def test_non_integral_timestamp(tmp_path: Path):
    write(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t881250949\n1\t3\t881250949.5\n")
    e = raises(tmp_path)
    assert "x.inter" in str(e) and "'timestamp:float'" in str(e) and "line 3" in str(e) and "not an integer" in str(e)


def test_timestamp_out_of_int64_range(tmp_path: Path):
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu,i,1\nu,i,99999999999999999999\nu,i,1e30\n")
    e = raises(tmp_path)
    assert "int64" in str(e) and "line 3" in str(e) and e.rows == [3, 4]


def test_non_integral_float_parquet_timestamp(tmp_path: Path):
    f = tmp_path / "interactions.parquet"
    pq.write_table(pa.table({"user_id": ["a", "b"], "item_id": ["x", "y"], "timestamp": [1.0, 2.5]}), f)
    e = raises(tmp_path)
    assert "not an integer" in str(e) and e.rows == [1]


def test_missing_directory(tmp_path: Path):
    e = raises(tmp_path / "nope")
    assert "nope" in str(e) and "no such" in str(e)


def test_missing_file_explicit_format(tmp_path: Path):
    e = raises(tmp_path, "movielens-100k")
    assert "u.data" in str(e) and "not found" in str(e)


def test_unknown_directory_contents(tmp_path: Path):
    write(tmp_path / "readme.txt", "hello")
    write(tmp_path / "notes.md", "hi")
    with pytest.raises(DataFormatError) as ei:
        detect_format(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path) in msg and "readme.txt" in msg and "u.data" in msg and ".inter" in msg


def test_bad_genre_flag(ml100k: Path):
    write(ml100k / "u.item", f"1|T|d||u|{genres_row([]).replace('0', '2', 1)}\n")
    e = raises(ml100k)
    assert "u.item" in str(e) and "line 1" in str(e) and "'g0'" in str(e)


def test_movies_dat_bad_line(mldat: Path):
    write(mldat / "movies.dat", "1::Toy Story::Comedy\n2 Jumanji Adventure\n")
    e = raises(mldat)
    assert "movies.dat" in str(e) and "line 2" in str(e)


def test_unknown_format_name(tmp_path: Path):
    with pytest.raises(DataFormatError, match="unknown format"):
        load_dataset(tmp_path, "excel")


def test_line_numbers_count_multiline_quoted_fields(tmp_path: Path):
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu,a,1\nu,b,2\n")
    write(tmp_path / "items.csv", 'item_id,title,genres\na,"Two\nlines",x\n,Nameless,y\n')
    e = raises(tmp_path)
    assert "items.csv" in str(e) and "'item_id'" in str(e) and e.line == 4


def test_parquet_catalog_with_list_genres(tmp_path: Path):
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": [10, 20], "timestamp": [2, 1]}),
                   tmp_path / "interactions.parquet")
    pq.write_table(pa.table({"item_id": [10, 20], "title": ["A", None], "genres": [["x", "y"], []]}),
                   tmp_path / "items.parquet")
    data = load_dataset(tmp_path)
    assert data.interactions["item_id"].tolist() == ["10", "20"]
    assert data.interactions["timestamp"].tolist() == [2, 1]
    items = data.items
    assert items["item_id"].tolist() == ["10", "20"]
    assert items["genres"].iloc[0] == "x|y" and pd.isna(items["genres"].iloc[1]) and pd.isna(items["title"].iloc[1])


def test_recbole_without_timestamp_uses_order_column(tmp_path: Path):
    write(tmp_path / "d.inter", "user_id:token\titem_id:token\tpos:float\nu\ta\t0\nu\tb\t1\n")
    e = raises(tmp_path)
    assert "d.inter" in str(e) and "order_column" in str(e)
    data = load_dataset(tmp_path, order_column="pos")
    assert data.interactions["timestamp"].tolist() == [0, 1] and "rating" not in data.interactions


# ---------------------------------------------------------------------------------------------- rating scales
def _scale_rows(ratings: list[float]) -> list[tuple[int, int, float, int]]:
    """Every rating of a scale, spread over users with >= 3 events each."""
    return [(1 + i // 3, 100 + i, r, 1_000_000_000 + i) for i, r in enumerate(ratings * 3)]


def _write_format(d: Path, fmt: str, rows) -> Path:
    if fmt == "movielens-100k":
        write(d / "u.data", "".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in rows))
    elif fmt == "movielens-dat":
        write(d / "ratings.dat", "".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in rows))
    elif fmt == "movielens-csv":
        write(d / "ratings.csv", "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    else:
        write(d / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
              + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    return d


REAL_SCALES = {
    "movielens-100k": [1, 2, 3, 4, 5],
    "movielens-dat": [1, 2, 3, 4, 5],
    "movielens-csv": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0],  # ml-latest / ml-20m / ml-25m
    "recbole": [1, 2, 3, 4, 5],
}


@pytest.mark.parametrize("fmt", sorted(REAL_SCALES))
def test_each_format_real_rating_scale_passes_validation_with_defaults(fmt, tmp_path: Path):
    from asft.config import load_config
    from asft.data.expectations import validate_raw

    d = _write_format(tmp_path / fmt, fmt, _scale_rows(REAL_SCALES[fmt]))
    data = load_dataset(d)
    assert data.format == fmt
    assert sorted(data.interactions["rating"].unique()) == sorted(float(r) for r in REAL_SCALES[fmt])
    rep = validate_raw(data.interactions, data.items, load_config(None), fmt, fmt=data.format)
    assert rep["failed"] == 0, rep


@pytest.mark.parametrize("fmt,bad", [("movielens-csv", 0.0), ("movielens-csv", 4.3), ("movielens-csv", 5.5),
                                     ("movielens-100k", 6)])
def test_ratings_off_the_format_scale_fail_by_name(fmt, bad, tmp_path: Path):
    from asft.config import load_config
    from asft.data.expectations import validate_raw
    from asft.data.validation import DataValidationError

    rows = _scale_rows(REAL_SCALES[fmt])
    rows[4] = (*rows[4][:2], bad, rows[4][3])
    data = load_dataset(_write_format(tmp_path / "d", fmt, rows))
    with pytest.raises(DataValidationError) as e:
        validate_raw(data.interactions, data.items, load_config(None), "bad", fmt=data.format)
    assert "rating" in str(e.value) and fmt in str(e.value)


def test_declared_rating_scale_wins(tmp_path: Path):
    from asft.config import load_config
    from asft.data.expectations import validate_raw
    from asft.data.schema import rating_scale

    assert rating_scale("movielens-csv") == (0.5, 5.0, 0.5)
    assert rating_scale("generic") == (1.0, 5.0, None)
    assert rating_scale("movielens-csv", rating_max=10) == (0.5, 10.0, None)
    rows = [(u, i, r * 2, t) for u, i, r, t in _scale_rows(REAL_SCALES["movielens-csv"])]  # a 1-10 scale
    data = load_dataset(_write_format(tmp_path / "d", "movielens-csv", rows))
    cfg = load_config(None, ["validation.rating_min=1", "validation.rating_max=10"])
    assert validate_raw(data.interactions, data.items, cfg, "ten", fmt=data.format)["failed"] == 0
