"""Trajectory datasets: the format, the sample index, generators and ingest."""

from gradlake.data.format import Dataset, DatasetWriter, open_checked, register_reader
from gradlake.data.generate import generate
from gradlake.data.index import SampleIndex, split_trajectories
from gradlake.data.well import WellDataset, well_files

register_reader(well_files, WellDataset.open)  # Dataset.open reads The Well's HDF5 files in place

__all__ = ["Dataset", "DatasetWriter", "SampleIndex", "generate", "open_checked", "split_trajectories"]
