"""`gradlake info` states what a store's projected H is once an exact run has measured K's spectrum:
d_eff at the run's λ and the effective ridge μ_k (d_eff(μ_k) = k) of the store's k."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradlake.stages.exact_ridge import DEFF_GRID, effective_ridge
from gradlake.store import GradientStore, create_store
from test_store_io import CKPT, fill, make_spec


def test_info_prints_d_eff_and_the_effective_ridge_of_the_store(tmp_path, cli):
    url = str(tmp_path / "store")
    spec, held = make_spec(shard_rows=16)
    create_store(url, spec, CKPT)
    fill(url, spec, held, shards=range(spec.n_shards))
    code, out, _ = cli(["info", url])
    assert code == 0 and "exact" not in out  # no spectrum yet: nothing claimed

    folder = tmp_path / "store" / "reduce" / "default"
    folder.mkdir(parents=True)
    k = GradientStore.open(url).spec.k
    for top, inside in ((2, True), (12, False)):  # μ_k inside the measured λ grid, and above it
        mu = np.logspace(top, -9, 3000)  # a known spectrum: d_eff(λ) = Σ μ/(μ + λ)
        d_eff = lambda lam: float((mu / (mu + lam)).sum())  # noqa: E731
        rows = [{"minibatch": m, "lambda": lam, "d_eff": d_eff(lam)} for m in range(2) for lam in DEFF_GRID]
        pq.write_table(pa.Table.from_pylist(rows), folder / "exact_spectrum.parquet")
        (folder / "exact.json").write_text(json.dumps({"damping": 1e-3, "d_eff": d_eff(1e-3), "n_outputs": 3000}))
        code, out, _ = cli(["info", url, "--json"])
        ridge = json.loads(out)["exact"]["default"]
        want = effective_ridge(d_eff, k)
        assert code == 0 and ridge["k"] == k
        if inside:
            assert abs(np.log(ridge["mu_k"] / want)) < np.log(1.5), (ridge, want)
            code, out, _ = cli(["info", url])
            assert f"d_eff = {d_eff(1e-3):,.0f} of 3,000 outputs" in out and f"μ_k = {ridge['mu_k']:.3g}" in out
        else:  # not extrapolated: stated as beyond the grid
            assert ridge["mu_k"] is None and ridge["mu_k_beyond"] == max(DEFF_GRID) < want
            code, out, _ = cli(["info", url])
            assert f"μ_k > {max(DEFF_GRID):g}" in out
