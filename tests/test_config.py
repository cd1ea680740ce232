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
        ({"data": {"splits": [0.5, 0.5, 0.5]}}, "data.splits: expected three fractions"),
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
    ],
)
def test_bad_settings_name_the_key(values, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.parse_job(values)


def test_defaults_round_trip_through_json():
    job = config.parse_job({})
    assert '"k_in": 16' in config.dumps(job)
