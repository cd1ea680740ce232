"""Trajectory datasets: the format, the sample index, generators and ingest."""

from gradlake.data.format import Dataset, DatasetWriter
from gradlake.data.generate import generate
from gradlake.data.index import SampleIndex, split_trajectories

__all__ = ["Dataset", "DatasetWriter", "SampleIndex", "generate", "split_trajectories"]
