import dataclasses

import pytest

from gradlake import config
from gradlake.errors import InputError


def test_quickstart_job_parses():
    job = config.load_job("jobs/quickstart.toml")
    assert job.name == "quickstart"
    assert job.store_url.endswith("runs/quickstart/store")
    assert job.grads.k_in == 8


@pytest.mark.parametrize(
    "values, message",
    [
        ({"grads": {"k_in": -3}}, "grads.k_in: expected int > 0, got -3"),
        ({"grads": {"k_in": "8"}}, "grads.k_in: expected int, got '8'"),
        ({"grads": {"kin": 8}}, "grads.kin: unknown setting"),
        ({"model": {"name": "resnet"}}, "model.name: expected one of 'unet', 'vit'"),
        ({"data": {"split_fractions": [0.5, 0.5, 0.5]}}, "data.split_fractions: expected three fractions"),
        ({"data": {"splits": [0.5, 0.5], "split_fractions": [0.5, 0.5, 0]}}, "data.splits: renamed data.split_fractions"),
        ({"reduce": {"pairs": ["CX"]}}, "reduce.pairs"),
        ({"stages": ["data", "cook"]}, "stages: unknown stage 'cook'"),
        ({"store": {"storage_options": {"secret": "x"}}}, "credentials never go into a job file"),
        ({"store": {"storage_options": {"client_kwargs": {"aws_secret_access_key": "x"}}}},
         "store.storage_options.client_kwargs.aws_secret_access_key: credentials never"),
        ({"store": {"storage_options": {"account_key": "x"}}}, "account_key: credentials never"),
        ({"reduce": {"exact": {"rtol": 0}}}, "reduce.exact.rtol: expected float > 0"),
        ({"grads": {"allocation": "greedy"}}, "grads.allocation: expected one of 'uniform', 'energy'"),
        ({"grads": {"calibration_samples": 0}}, "grads.calibration_samples: expected int > 0"),
        ({"reduce": {"metric_estimator": "x"}}, "reduce.metric_estimator: expected one of 'probes', 'shrink'"),
        ({"grads": {"probe_seed": -1}}, "grads.probe_seed: expected int >= 0, got -1"),
        ({"grads": {"probe_seed": "7"}}, "grads.probe_seed: expected int, got '7'"),
    ],
)
def test_bad_settings_name_the_key(values, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.parse_job(values)


def test_defaults_round_trip_through_json():
    job = config.parse_job({})
    assert '"k_in": 16' in config.dumps(job)


def test_a_renamed_setting_is_read_under_its_old_name_with_a_warning():
    with pytest.warns(FutureWarning, match="data.splits is renamed data.split_fractions"):
        job = config.parse_job({"data": {"splits": [0.5, 0.25, 0.25]}})
    assert job.data.split_fractions == (0.5, 0.25, 0.25)
    with pytest.warns(FutureWarning), pytest.raises(InputError, match="data.split_fractions: expected three"):
        config.parse_job({"data": {"splits": [0.5, 0.5, 0.5]}})


def test_the_exact_modes_compute_dtype_is_read_under_its_old_name_with_a_warning():
    with pytest.warns(FutureWarning, match="reduce.exact.dtype is renamed reduce.exact.compute_dtype"):
        job = config.parse_job({"reduce": {"exact": {"dtype": "float32"}}})
    assert job.reduce.exact.compute_dtype == "float32"
    with pytest.raises(InputError, match="give only reduce.exact.compute_dtype"):
        config.parse_job({"reduce": {"exact": {"dtype": "float32", "compute_dtype": "float32"}}})
    assert config.RENAMED == {("data", "splits"): "split_fractions", ("grads", "dtype"): "storage_dtype",
                              ("reduce.exact", "dtype"): "compute_dtype"}


def test_renamed_settings_keep_the_reduce_and_exact_hashes_and_records():
    """The reduce stage's hash, the exact minibatches' records and the reduce's recorded settings
    hold reduce.exact.compute_dtype under its old name, dtype, so finished results stay finished."""
    from gradlake.pipeline import _stage_plan
    from gradlake.stages.exact_plan import ExactSpec

    job = config.parse_job({"reduce": {"exact": {"compute_dtype": "float32"}}})
    reduce = dataclasses.asdict(job.reduce)
    reduce["exact"]["dtype"] = reduce["exact"].pop("compute_dtype")
    assert config.recorded(job.reduce) == reduce
    plan = _stage_plan(job)
    assert plan["reduce"][0] == config.settings_hash(plan["grads"][0], reduce)
    spec = ExactSpec("ckpt", "data", "out", job.reduce.exact, 0.1)
    assert spec.record["settings"] == config.settings_hash(reduce["exact"], {
        "damping": 0.1, "lambdas": [], "pairs": list(spec.pairs), "normalize": list(spec.normalize)})


def test_the_old_name_still_builds_a_data_config():
    with pytest.warns(FutureWarning, match="split_fractions"):
        data = config.DataConfig(splits=(0.5, 0.25, 0.25))
    assert data == config.DataConfig(split_fractions=(0.5, 0.25, 0.25))
    assert "splits" not in dataclasses.asdict(data)


def test_renamed_settings_keep_the_stage_hashes():
    """A job's stages recorded as done (job.json) stay done across the renames: the data and
    grads stages' hashes are the ones computed under the old names."""
    import dataclasses

    from gradlake.pipeline import _stage_plan

    job = config.parse_job({"data": {"split_fractions": [0.5, 0.25, 0.25]}, "grads": {"storage_dtype": "float32"}})
    data = dataclasses.asdict(job.data)
    data["splits"] = data.pop("split_fractions")
    grads = dataclasses.asdict(job.grads)
    grads["dtype"] = grads.pop("storage_dtype")
    del grads["probe_seed"]  # added later: it counts only when set
    plan = _stage_plan(job)
    assert plan["data"][0] == config.settings_hash(data, job.data_url)
    assert plan["grads"][0] == config.settings_hash(plan["train"][0], grads, job.store_url)


def test_probe_seed_defaults_to_the_projection_seed_and_keeps_the_grads_hash():
    """grads.probe_seed unset: the probes' seed is grads.seed (as before the two were split) and
    the grads stage's hash is what it was; set, even to grads.seed, it is a new setting."""
    from gradlake.pipeline import _stage_plan, resolved

    job = config.parse_job({"grads": {"seed": 3}})
    assert job.grads.probe_seed is None and job.grads.effective_probe_seed == 3
    assert resolved(job)["grads"]["probe_seed"] == 3
    grads = dataclasses.asdict(job.grads)
    grads["dtype"] = grads.pop("storage_dtype")
    del grads["probe_seed"]
    plan = _stage_plan(job)
    assert plan["grads"][0] == config.settings_hash(plan["train"][0], grads, job.store_url)
    split = config.parse_job({"grads": {"seed": 3, "probe_seed": 5}})
    assert split.grads.effective_probe_seed == 5 and split.grads.seed == 3
    assert _stage_plan(split)["grads"][0] != plan["grads"][0]
    assert _stage_plan(split)["train"][0] == plan["train"][0]
