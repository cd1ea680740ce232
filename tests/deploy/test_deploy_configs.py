"""cluster/ and deploy/ files: valid for Ray's launcher schema and for what KubeRay requires."""

import warnings
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "local.yaml"])
def test_cluster_configs_pass_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster" / name).read_text()))
    validate_config(config)  # raises on a schema violation
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in starts


def test_aws_config_has_cpu_head_and_autoscaling_gpu_workers():
    config = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    worker = nodes["gpu_worker"]
    assert worker["min_workers"] < worker["max_workers"]
    assert worker["node_config"]["InstanceType"].startswith(("g", "p"))


def _containers(pod_template):
    return pod_template["spec"]["containers"]


def _check_cluster_spec(spec):
    assert Version(spec["rayVersion"]) >= Version("2.52")  # token authentication needs it
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and _containers(head["template"])
    groups = spec["workerGroupSpecs"]
    assert groups, "at least one worker group"
    for group in groups:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in _containers(group["template"]):
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for template in [head["template"]] + [g["template"] for g in groups]:
        for c in _containers(template):
            assert c["name"] and c["image"]
            # S3 credentials from a Kubernetes Secret, never inline values
            assert any("secretRef" in e for e in c.get("envFrom", []))
            assert not any(e.get("name", "").startswith("AWS_") and "value" in e for e in c.get("env", []))


def test_raycluster_manifest():
    doc = yaml.safe_load((ROOT / "deploy" / "raycluster.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_rayjob_manifest_runs_a_job_file_in_the_image():
    doc = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    entry = doc["spec"]["entrypoint"]
    assert entry.startswith("gradlake run /opt/gradlake/jobs/")
    job_file = entry.split()[2].replace("/opt/gradlake/", "")
    assert (ROOT / job_file).is_file(), f"the RayJob runs {job_file}, which the image must carry"
    _check_cluster_spec(doc["spec"]["rayClusterSpec"])


def test_dockerfile_installs_gradlake_with_cuda_and_carries_jobs():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM nvidia/cuda" in text
    assert "COPY jobs" in text and 'pip install ".' in text
    assert "AWS_SECRET" not in text and "RAY_AUTH_TOKEN=" not in text


def test_dockerfile_installs_the_runtime_extras_and_the_clusters_ray():
    import re

    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'pip install ".[index]"' in text and ".[test]" not in text  # what gradlake runs with, not its tests
    pins = re.findall(r'"ray\[default\]==([0-9.]+)"', text)
    cluster = yaml.safe_load((ROOT / "deploy" / "raycluster.yaml").read_text())["spec"]["rayVersion"]
    job = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]["rayVersion"]
    assert pins == [cluster] == [job]


def test_zarr_is_bounded_to_the_release_the_shard_decoder_is_tested_against():
    import zarr
    from packaging.requirements import Requirement

    from gradlake.store import zarr_shard

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == "zarr"]
    assert zarr.__version__ in spec and "3.1.0" in spec  # the tests run on what it admits
    assert "3.2.0" not in spec and "4.0" not in spec and "3.0.10" not in spec
    assert "bounds zarr to 3.1.x" in zarr_shard.__doc__  # the one place that says why, and when it goes


def _make_install(*overrides):
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make")
    result = subprocess.run(["make", "-n", "--always-make", "install", "VENV=/nonexistent/venv", *overrides],
                            cwd=ROOT, capture_output=True, text=True)
    torch_lines = [line for line in result.stdout.splitlines() if "torch" in line]
    return result.returncode, torch_lines, result.stderr


def test_makefile_chooses_the_torch_build_explicitly():
    code, lines, _ = _make_install()  # the default: the CPU build, from PyTorch's CPU index or the configured one
    assert code == 0 and len(lines) == 1
    assert "--no-deps 'torch==2.13.0+cpu' --extra-index-url https://download.pytorch.org/whl/cpu" in lines[0]
    code, lines, _ = _make_install("DEVICE=cuda")
    assert code == 0 and "'torch==2.13.0+cu128' --extra-index-url https://download.pytorch.org/whl/cu128" in lines[0]
    code, lines, err = _make_install("DEVICE=gpu")
    assert code != 0 and "DEVICE must be cpu or cuda, got 'gpu'" in err
    code, lines, _ = _make_install("TORCH=")  # keep the torch you have
    assert code == 0 and lines == []


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.toml")))
def test_every_job_file_validates(job):
    from gradlake.config import load_job

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shipped job uses no renamed key
        settings = load_job(ROOT / "jobs" / job)
    if job.startswith("paper-mini-"):  # the paper in miniature: the exact H on several minibatches, 2 CPUs
        assert settings.reduce.exact.enabled and settings.reduce.exact.minibatches > 1
        assert settings.train.patience > 0 and settings.ray.num_cpus == 2
    elif job.startswith("paper-"):
        assert settings.model.preset == "paper" and settings.data.resolution == 128
        assert len(settings.train.seeds) == 3 and settings.data.url.startswith("s3://")
