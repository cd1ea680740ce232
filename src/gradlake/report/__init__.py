"""The report: PNG figures of the reduce's influence quantities and an index.html linking them.

    build_report(store_url, out_dir, reduce_name="default", train_dir=None, storage_options=None)
        -> path of <out_dir>/index.html

figures (pure plotting: arrays in, PNG out), inputs (readers of the reduce results, training
histories and rollout tables), plan (the page plan: sections and their figures), one module per
group of sections (training_sections, influence_sections, lag_section, exact_section, lds),
provenance_table, html (the page), files (the report's folder), build (plan, draw, write).
"""

from gradlake.report.build import build_report

__all__ = ["build_report"]
