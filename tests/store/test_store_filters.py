"""The --where language against numpy masks computed by hand."""

import numpy as np
import pyarrow as pa
import pytest

from gradlake.errors import InputError
from gradlake.store.filters import parse_where, select

ROWS = 40
RNG = np.random.default_rng(0)
TABLE = pa.table({
    "row": np.arange(ROWS, dtype=np.int64),
    "trajectory": np.arange(ROWS, dtype=np.int64) // 8,
    "t": (np.arange(ROWS) % 8).astype(np.int32),
    "class": np.array(["rp", "crp", "rpui", "rp", "crp"])[np.arange(ROWS) // 8],
    "split": np.array(["train", "train", "val", "test", "train"])[np.arange(ROWS) // 8],
    "loss": RNG.random(ROWS).astype(np.float32),
})
COLS = {name: TABLE.column(name).to_numpy(zero_copy_only=False) for name in TABLE.column_names}


def rows_where(text):
    return TABLE.filter(parse_where(text, TABLE.schema)).column("row").to_numpy()


@pytest.mark.parametrize("text, mask", [
    ("class == 'rp' and t < 4", (COLS["class"] == "rp") & (COLS["t"] < 4)),
    ('split != "train"', COLS["split"] != "train"),
    ("2 <= t < 5", (COLS["t"] >= 2) & (COLS["t"] < 5)),
    ("class in ['rp', 'rpui'] or trajectory == 1", np.isin(COLS["class"], ["rp", "rpui"]) | (COLS["trajectory"] == 1)),
    ("not (t >= 3 or class == 'crp')", ~((COLS["t"] >= 3) | (COLS["class"] == "crp"))),
    ("trajectory not in (0, 2,) and loss > 0.5", ~np.isin(COLS["trajectory"], [0, 2]) & (COLS["loss"] > 0.5)),
    ("t > -1 and 3.5 > t", (COLS["t"] > -1) & (COLS["t"] < 3.5)),
    ("class == 'rp' or class == 'crp' and t == 0", (COLS["class"] == "rp") | ((COLS["class"] == "crp") & (COLS["t"] == 0))),
])
def test_where_matches_numpy(text, mask):
    np.testing.assert_array_equal(rows_where(text), COLS["row"][mask])


def test_keyword_selection_matches_numpy():
    expr = select(classes=["rp"], splits=["train", "test"], t_min=2, t_max=5)
    got = TABLE.filter(expr).column("row").to_numpy()
    mask = (COLS["class"] == "rp") & np.isin(COLS["split"], ["train", "test"]) & (COLS["t"] >= 2) & (COLS["t"] <= 5)
    np.testing.assert_array_equal(got, COLS["row"][mask])
    assert select() is None


def test_unknown_column_lists_the_columns():
    with pytest.raises(InputError, match=r"unknown column 'klass'; the columns are: row, trajectory, t, class, split, loss"):
        parse_where("klass == 'rp'", TABLE.schema)


@pytest.mark.parametrize("text, message", [
    ("class == 3", "column 'class' holds string"),
    ("t == 'x'", "column 't' holds int32"),
    ("t < ", "expected a column name or a value, found the end"),
    ("t = 3", "cannot read '= 3'"),
    ("(t < 3", "expected ')'"),
    ("t < 3 t", "expected 'and', 'or' or the end"),
    ("1 < 2", "needs at least one column"),
    ("", "empty expression"),
    ("__import__('os')", "unknown column '__import__'"),
])
def test_bad_expressions_are_input_errors(text, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_where(text, TABLE.schema)
