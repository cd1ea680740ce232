"""The report's parts: PNG figures of the reduce's influence quantities and an index.html linking them.

figures (pure plotting: arrays in, PNG out), inputs (readers of the reduce results, training
histories and rollout tables), plan (the page plan: sections and their figures), one module per
group of sections (training_sections, influence_sections, lag_section, exact_section, lds),
provenance_table, html (the page), files (the report's folder). The stage that plans the page,
draws its figures and writes it is gradlake.stages.report (run by ``gradlake.pipeline.build_report``).
"""
