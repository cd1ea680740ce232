"""Job files (TOML) -> typed, validated settings: the schema (:mod:`gradlake.config.schema`,
one frozen dataclass per section) and its parsing (:mod:`gradlake.config.parsing`); no I/O
beyond reading the job file (what a job resolves to against files: gradlake.pipeline.resolved).
"""

from gradlake.config.parsing import RENAMED, SECRET_WORDS, _build, dumps, load_job, parse_job, secret_option
from gradlake.config.schema import (
    NORMALIZATIONS,
    OBSERVABLES,
    STAGES,
    DataConfig,
    EvalConfig,
    ExactConfig,
    GradsConfig,
    JobConfig,
    LdsConfig,
    ModelConfig,
    RayConfig,
    ReduceConfig,
    ReportConfig,
    StoreConfig,
    TaskConfig,
    TrainConfig,
    fraction,
    help_of,
    non_negative,
    positive,
    recorded,
    rule,
    setting,
    settings_hash,
)

__all__ = [
    "NORMALIZATIONS", "OBSERVABLES", "RENAMED", "SECRET_WORDS", "STAGES", "DataConfig", "EvalConfig", "ExactConfig",
    "GradsConfig", "JobConfig", "LdsConfig", "ModelConfig", "RayConfig", "ReduceConfig", "ReportConfig",
    "StoreConfig", "TaskConfig", "TrainConfig", "_build", "dumps", "fraction", "help_of", "load_job",
    "non_negative", "parse_job", "positive", "recorded", "rule", "secret_option", "setting", "settings_hash",
]
