"""Command-line behaviour on plausible mistakes: one line and exit 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gradlake.cli.grads import expand_checkpoints

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
from grads_fixtures import write_checkpoints  # noqa: E402


def test_a_file_in_a_checkpoint_folder_means_the_folder(tmp_path):
    first, second = write_checkpoints(str(tmp_path / "train"))
    got = expand_checkpoints([f"{first}/model.safetensors", f"{second}/optimizer.safetensors",
                              f"{first}/config.json", f"{second}/", str(tmp_path / "train")], {})
    assert got == [first, second, first, second, first, second]


@pytest.mark.s3
def test_run_to_s3_without_credentials_is_one_line_before_any_work(tmp_path, s3_server):
    job = tmp_path / "job.toml"
    job.write_text(f'out = "s3://bucket/runs/x"\n[store]\nstorage_options = {{ endpoint_url = "{s3_server}" }}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    result = subprocess.run([sys.executable, "-m", "gradlake", "run", str(job), "--quiet"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "out s3://bucket/runs/x: no S3 credentials" in result.stderr
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in result.stderr
    assert "[data] running" not in result.stdout  # detected before any stage started
