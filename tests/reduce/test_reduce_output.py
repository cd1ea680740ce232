"""Reduce results carry their labels as coordinate arrays: zarr, gradlake and xarray read them."""

import numpy as np
import pytest
import zarr

from gradlake.reduce.output import ReduceOutput, coordinates


def test_labels_are_coordinate_arrays_that_xarray_reads(tmp_path):
    xr = pytest.importorskip("xarray")
    out = ReduceOutput(str(tmp_path / "r"))
    values = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    labels = {"pair": ["CC", "MC"], "response_class": ["crp", "rp", "rpui"], "t_response": [0, 1, 2, 3]}
    out.write_array("ck/transfer", values, ("pair", "response_class", "t_response"), coords=labels,
                    description="test")
    out.write_array("ck/counts", values[0].astype(np.int64), ("response_class", "t_response"),
                    coords={"response_class": labels["response_class"]})
    out.write_array("ck/metric", np.eye(3), ("proj", "proj_"))

    group = zarr.open_group(str(tmp_path / "r" / "results.zarr"), mode="r")
    assert "coords" not in group["ck/transfer"].attrs and group["ck/transfer"].attrs["description"] == "test"
    assert coordinates(group["ck"], "transfer") == labels
    assert coordinates(group["ck"], "metric") == {}

    ds = xr.open_zarr(str(tmp_path / "r" / "results.zarr"), group="ck", consolidated=False)
    assert ds["transfer"].dims == ("pair", "response_class", "t_response")
    assert ds["pair"].values.tolist() == ["CC", "MC"] and ds["t_response"].values.tolist() == [0, 1, 2, 3]
    assert float(ds["transfer"].sel(pair="MC", response_class="rp", t_response=2)) == values[1, 1, 2]
    assert ds["counts"].sel(response_class="rpui").values.tolist() == values[0, 2].tolist()


def test_labels_must_fit_their_dimension(tmp_path):
    out = ReduceOutput(str(tmp_path / "r"))
    with pytest.raises(ValueError, match="3 labels for dimension 'pair'"):
        out.write_array("ck/x", np.zeros((2, 2)), ("pair", "t"), coords={"pair": ["CC", "MC", "EC"]})
    with pytest.raises(ValueError, match="for dimension 'class'"):
        out.write_array("ck/x", np.zeros((2, 2)), ("pair", "t"), coords={"class": ["a", "b"]})
