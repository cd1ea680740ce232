"""The job file's schema: one frozen dataclass per section (a stage's settings), each field
with its type, default, value check and help text (the command line's too); and
:class:`JobConfig`, the whole job, with the locations of each stage's output.

Parsing and the checks that span several settings: :mod:`gradlake.config.parsing`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal

OBSERVABLES = ("C", "M", "E", "V")
NORMALIZATIONS = ("none", "row-std", "cosine")


def _check(cond: Any, message: str):
    return message if not cond else None


def positive(x) -> str | None:
    return _check(x > 0, "> 0")


def non_negative(x) -> str | None:
    return _check(x >= 0, ">= 0")


def fraction(x) -> str | None:
    return _check(0 < x < 1, "in (0, 1)")


def rule(check, default=dataclasses.MISSING, help: str = "", **kw):
    """A dataclass field carrying a value check (returns what was expected, or None) and
    its help text (the command line's too)."""
    metadata = {"check": check, "help": help}
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return field(metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def setting(default, help: str, was: str = ""):
    """A dataclass field with its help text (and no value check). ``was``: the setting's old name,
    if it was renamed: job files may still give it (a FutureWarning), and hashes and result
    records keep it (:func:`recorded`), so results made before the rename still match."""
    return field(default=default, metadata={"help": help, **({"was": was} if was else {})})


def help_of(section, name: str) -> str:
    """The help text of setting ``name`` of a settings dataclass ("" when it has none)."""
    return {f.name: f for f in dataclasses.fields(section)}[name].metadata.get("help", "")


@dataclass(frozen=True)
class DataConfig:
    """Where the trajectories come from: a built-in generator or an existing dataset URL."""

    source: Literal["generate", "url"] = "generate"
    url: str = ""  # dataset URL; empty -> <out>/data
    family: Literal["euler", "ns"] = "euler"
    classes: tuple[str, ...] = ("rp", "crp", "rpui")
    trajectories: int = rule(positive, 6)  # per class
    steps: int = rule(lambda x: _check(x >= 2, ">= 2"), 9)  # stored snapshots per trajectory
    resolution: int = rule(lambda x: _check(x >= 8, ">= 8"), 64)
    seed: int = 0
    split_fractions: tuple[float, float, float] = setting((0.65, 0.05, 0.30), "Train / val / test fractions, by "
                                                          "trajectory.", was="splits")
    output_dt: float = rule(non_negative, 0.0)  # time between snapshots; 0 -> the family's default
    cfl: float = rule(lambda x: _check(0 <= x < 1, "in [0, 1)"), 0.0)  # 0 -> the family's default
    viscosity: float = rule(positive, 1e-3)  # ns only
    batch: int = rule(positive, 16)  # trajectories simulated at once
    device: str = "cpu"  # torch device of the generators ("auto" -> cuda when available)
    # The old name of split_fractions, still taken by the constructor (with a FutureWarning);
    # not a setting: job files' data.splits is renamed while parsing (RENAMED).
    splits: InitVar[tuple[float, float, float] | None] = None

    def __post_init__(self, splits):
        if splits is not None:
            warnings.warn("DataConfig(splits=...) is renamed DataConfig(split_fractions=...)", FutureWarning,
                          stacklevel=3)
            object.__setattr__(self, "split_fractions", tuple(splits))


@dataclass(frozen=True)
class TaskConfig:
    """The loss and the named observables (see :mod:`gradlake.physics`)."""

    path: str = ""  # import path "package.module:Name"; empty -> the paper's (gradlake.physics:PDETask)
    kwargs: dict[str, Any] = field(default_factory=dict)  # arguments of Name (a class or factory)


@dataclass(frozen=True)
class ModelConfig:
    name: Literal["unet", "vit"] = "unet"
    preset: Literal["tiny", "small", "paper"] = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    # A user model instead of a preset: "package.module:Name", an nn.Module class or factory
    # called with kwargs, mapping [batch, C, *grid] to the same shape.
    path: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Initial weights (.safetensors, or weights-only .pt) at any fsspec URL: training starts
    # from them; with train.epochs = 0 they are the one checkpoint analysed (epoch-0000).
    checkpoint: str = ""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = rule(non_negative, 2, help="Epochs in total (a resumed run continues to this); 0: only with "
                                             "model.checkpoint (analyse it as is).")
    batch_size: int = rule(positive, 48, help="Samples per optimizer step.")
    lr: float = rule(positive, 5e-4, help="AdamW learning rate.")
    weight_decay: float = rule(non_negative, 1e-4, help="AdamW weight decay.")
    checkpoint_every: int = rule(positive, 1, help="Write a checkpoint every N epochs (and after the last).")
    patience: int = rule(non_negative, 0, help="Stop once the validation SMSE has not improved on its best for this "
                                               "many epochs (a checkpoint is written then); 0: train every epoch.")
    seed: int = setting(0, "Seed of the initial weights and of the data order.")
    seeds: tuple[int, ...] = setting((), "Independent training runs, one per seed (train/seed-<s>/); empty: [seed].")
    device: str = setting("auto", "auto (GPU if there is one), cpu, or cuda[:n].")
    # Memory for trajectories held while streaming an epoch: the data order shuffles
    # trajectories, then samples within windows of trajectories that fit half of this.
    window_mb: int = rule(positive, 1024, help="Memory (MB) for trajectories held while streaming an epoch.")
    deterministic: bool = setting(True, "GPU: deterministic cuDNN kernels (bitwise resume) or autotuned ones "
                                        "(maybe a little faster).")


@dataclass(frozen=True)
class GradsConfig:
    checkpoints: tuple[str, ...] = setting((), "Checkpoint names; empty: every checkpoint of the run.")
    observables: tuple[str, ...] = setting(("C", "M", "E", "V"), "Observables, comma-separated (C, M, E, V).")
    probes: int = rule(non_negative, 0, help="Random cotangents per sample for V; 0 = enough that train samples "
                                               "× probes >= 2k (a full-rank probe metric).")
    k_in: int = rule(positive, 16, help="Projection rows on the input side of each layer.")
    k_out: int = rule(positive, 16, help="Projection rows on the output side of each layer.")
    seed: int = setting(0, "Seed of the projection, and of the V probes unless --probe-seed is given.")
    probe_seed: int | None = rule(lambda x: _check(x is None or x >= 0, ">= 0"), None,
                                  help="Seed of the V probes (apart from the projection's); unset: --seed.")
    storage_dtype: Literal["float16", "float32"] = setting(
        "float16", "Stored dtype of φ: float16 or float32 (computed in --precision, then cast).", was="dtype")
    splits: tuple[str, ...] = setting(("train", "val", "test"), "Splits whose samples the store holds.")
    batch_size: int = rule(positive, 16, help="Samples per gradient batch.")
    shard_rows: int = rule(non_negative, 0, help="Rows per shard (one zarr shard, one writer; the unit of work and "
                                                 "of commits); 0 = sized by the store (64-128 MiB objects).")
    workers: int = rule(non_negative, 0, help="Ray actors; 0 = one per GPU, else one per CPU slot.")
    threads_per_worker: int = rule(positive, 1, help="Torch threads per CPU worker.")
    device: str = setting("auto", "auto, cpu or cuda.")
    projection: Literal["rademacher", "gaussian"] = setting("rademacher", "Projection entries: rademacher or gaussian.")
    k_dense: int = rule(non_negative, 0, help="Projection rows per parameter outside Linear/Conv; 0 = k_in * k_out.")
    precision: Literal["float32", "bfloat16"] = setting(
        "float32", "Compute precision (autocast) on GPUs: float32 or bfloat16 (no float16: cotangents underflow).")
    retries: int = rule(non_negative, 3, help="Attempts per failing shard after the first.")
    allocation: Literal["uniform", "energy"] = setting(
        "energy", "Projection rows per layer: uniform (k_in x k_out everywhere) or energy (by the per-example "
                   "gradient energy of --calibration-samples held samples; see gradlake.grads.allocation).")
    k_total: int = rule(non_negative, 0, help="Energy allocation: total k; 0 = the uniform projector's k.")
    calibration_samples: int = rule(positive, 8, help="Energy allocation: held samples that measure the energy.")

    @property
    def effective_probe_seed(self) -> int:
        """The V probes' seed: ``probe_seed``, else ``seed`` (the one seed of stores before the two split)."""
        return self.seed if self.probe_seed is None else self.probe_seed


@dataclass(frozen=True)
class ExactConfig:
    """The paper's exact minibatch influence over many minibatches (see gradlake.stages.exact_plan)."""

    enabled: bool = False
    checkpoint: str = ""  # empty -> last checkpoint
    per_class: int = rule(positive, 16)  # transitions per minibatch from one trajectory of each class
    minibatches: int = rule(non_negative, 1)  # how many minibatches of the split; 0 -> every one
    # lanczos: stop when the proven bound on H's error, in the units of every normalisation, is <= htol
    htol: float = rule(positive, 1e-3)
    rtol: float = rule(positive, 1e-6)  # pcg: relative residual per right-hand side
    # auto: dense when it fits in dense_gb, else lanczos (block Krylov: one solve, every λ);
    # pcg: Nyström-preconditioned CG (one λ); paper: the PDEHats solve (float32, stacked, loose)
    method: Literal["auto", "dense", "lanczos", "pcg", "paper"] = "auto"
    space: Literal["auto", "output", "parameter"] = "auto"  # auto: the smaller of outputs and parameters
    dense_gb: float = rule(positive, 4.0)  # memory of the dense path (J and the Gram, float64)
    dense_side: int = rule(positive, 4096)  # auto: dense only while the Gram's side is at most this (eigh ~ n³)
    krylov_gb: float = rule(positive, 4.0)  # lanczos: memory of the Krylov basis (float64)
    deff_probes: int = rule(non_negative, 8)  # lanczos: ±1 probes of d_eff(λ) in the same Krylov space
    paper_check: int = rule(non_negative, 0)  # minibatches (the first) also solved the paper's way, compared
    rank: int = rule(positive, 64)  # first Nyström rank of the PCG preconditioner (doubled as needed)
    max_rank: int = rule(positive, 1024)
    ks: tuple[int, ...] = (4, 8, 16)  # k_in = k_out settings of the agreement report
    agreement: int = rule(non_negative, 1)  # minibatches (the first ones) with the agreement report
    split: str = "test"  # the minibatches' trajectories come from this split
    classes: int = rule(positive, 3)  # how many classes (sorted by name) a minibatch takes
    probes: int = rule(non_negative, 0)  # V probes of the projected metric; 0: batch × probes >= 2k
    seed: int = 0  # projector and sketch seed
    max_iter: int = rule(positive, 2000)  # pcg and paper iterations; lanczos block steps
    block: int = rule(positive, 8)  # vectors per vmapped JVP/VJP (memory vs speed)
    cpus: int = rule(positive, 1)  # CPUs (torch threads) per minibatch task
    compute_dtype: Literal["float64", "float32"] = setting(
        "float64", "Precision of the model's products (J, JVP, VJP): float64 or float32.", was="dtype")
    device: str = "auto"


@dataclass(frozen=True)
class ReduceConfig:
    name: str = setting("default", "Results go to STORE/reduce/NAME/.")
    metric: Literal["V", "C"] = setting("V", "Metric: V (Gauss-Newton/NTK from random probes) or C (empirical Fisher).")
    metric_estimator: Literal["probes", "shrink"] = setting(
        "probes", "probes: the metric is the sum of probe outer products; shrink: its Ledoit-Wolf shrinkage "
                  "towards (tr/k) I, for reference samples x probes < k (gradlake.reduce.metric).")
    damping: float = rule(positive, 1e-4, help="Damping λ of (η̃ + λI)⁻¹.")
    lambdas: tuple[float, ...] = rule(lambda xs: _check(all(x > 0 for x in xs), "every λ > 0"), (),
                                      help="Extra λ values of a sweep, comma-separated: the aggregates at each, "
                                           "and the exact H at each from the same solve.")
    reference_split: str = setting("train", "Split of the metric and of row-std.")
    pairs: tuple[str, ...] = setting(("CC", "MC", "EC"), "Observable pairs (response, perturbation), comma-separated.")
    normalize: tuple[str, ...] = setting(NORMALIZATIONS, "Normalisations, comma-separated: none, row-std, cosine.")
    block_rows: int = rule(positive, 4096, help="Rows per task.")
    topk: int = rule(non_negative, 10, help="Most / least influential reference samples per query; 0 = none.")
    distance_pairs: int = rule(non_negative, 2000, help="Sampled pairs of influence vs input distance; 0 = none.")
    exact: ExactConfig = field(default_factory=ExactConfig)
    checkpoints: tuple[str, ...] = setting((), "Checkpoint names, comma-separated; empty: every checkpoint in the store.")
    # Sample selections: filters in the store's --where language; empty selects every sample.
    response: str = setting("", "Response samples i of the aggregates (a --where filter); empty: all.")
    perturbation: str = setting("", "Perturbation samples j of the aggregates (a --where filter); empty: all.")
    topk_queries: str = setting("split == 'test'", "Query samples of the top-k lists (a --where filter; "
                                                   "candidates: the reference split).")
    tile_rows: str = setting("split == 'test'", "Dense H tiles: response samples (a --where filter).")
    tile_cols: str = setting("split == 'test'", "Dense H tiles: perturbation samples (a --where filter).")
    tile_max: int = rule(non_negative, 4096, help="At most this many samples per tile side; 0 = no tiles.")
    tile_size: int = rule(positive, 1024, help="Samples per side of one tile (one task, one zarr chunk).")
    distance_bins: int = rule(positive, 20, help="Equal-count distance bins of the influence-vs-distance curve.")
    seed: int = setting(0, "Seed of the sampled distance pairs.")
    by_layer: bool = setting(False, "Also split the lag curves and top-k lists into per-layer shares.")


@dataclass(frozen=True)
class LdsConfig:
    """The linear datamodeling score (gradlake.lds): retrain on random α-subsets of the training
    trajectories (same [train] settings and init seed) and correlate the loss changes with the
    influence-predicted ones."""

    enabled: bool = False
    subsets: int = rule(lambda x: _check(x >= 2, ">= 2"), 32)  # M retrainings
    alpha: float = rule(fraction, 0.5)  # fraction of the training trajectories in each subset
    seed: int = 0  # subset m is a pure function of (seed, m)
    test: str = "split == 'test'"  # the test samples (a filter on the store's samples)
    cpus: int = rule(positive, 1)  # CPUs (torch threads) per retraining task
    exact: str = ""  # output of `gradlake exact` / reduce.exact; empty -> <store>/reduce/<reduce.name>


@dataclass(frozen=True)
class EvalConfig:
    lds: LdsConfig = field(default_factory=LdsConfig)


@dataclass(frozen=True)
class ReportConfig:
    enabled: bool = True
    out: str = ""  # empty -> <out>/report


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # empty -> RAY_ADDRESS or an embedded local Ray
    num_cpus: int = rule(non_negative, 0)  # embedded Ray only; 0 -> all cores


@dataclass(frozen=True)
class StoreConfig:
    url: str = ""  # gradient store URL; empty -> <out>/store
    # Non-secret options only (endpoint_url, region...). Credentials come from the
    # environment or a profile and are never written into a job file or a store.
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobConfig:
    name: str = "job"
    out: str = "runs/job"  # root of the job's outputs (local path or fsspec URL)
    stages: tuple[str, ...] = ("data", "train", "grads", "reduce", "lds", "report")  # lds: with eval.lds.enabled
    # Folders put first on sys.path (driver and workers) so that model.path and task.path
    # import without installing; relative ones are resolved against the job file's folder.
    python_path: tuple[str, ...] = ()
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grads: GradsConfig = field(default_factory=GradsConfig)
    reduce: ReduceConfig = field(default_factory=ReduceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    # Resolved locations of each stage's output.
    @property
    def data_url(self) -> str:
        return self.data.url or _join(self.out, "data")

    @property
    def train_dir(self) -> str:
        return _join(self.out, "train")

    def training_runs(self) -> list[tuple[int, str]]:
        """(seed, run directory) of each independent training run of the job."""
        if not self.train.seeds:
            return [(self.train.seed, self.train_dir)]
        return [(seed, _join(self.train_dir, f"seed-{seed}")) for seed in self.train.seeds]

    @property
    def store_url(self) -> str:
        return self.store.url or _join(self.out, "store")

    @property
    def lds_dir(self) -> str:
        return _join(self.out, "lds")

    @property
    def report_dir(self) -> str:
        return self.report.out or _join(self.out, "report")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STAGES = ("data", "train", "grads", "reduce", "lds", "report")


def recorded(settings) -> dict[str, Any]:
    """A settings dataclass as hashes and result records hold it: ``dataclasses.asdict``, with
    renamed settings under their old names (``was``)."""
    values = dataclasses.asdict(settings)
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        out[f.metadata.get("was", f.name)] = recorded(value) if dataclasses.is_dataclass(value) else values[f.name]
    return out


def settings_hash(*parts: Any) -> str:
    """A short, stable hash of settings (dataclasses, as :func:`recorded`, or JSON values): what a
    result depends on."""
    blob = json.dumps([recorded(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _join(root: str, part: str) -> str:
    from gradlake.fsio import join

    return join(root, part)

