"""Typed run configuration.

One :class:`RunConfig` describes a whole run; every section is a pydantic model that rejects unknown keys
(``extra="forbid"``) so a typo is an error, not a silently ignored setting. Sections that later subsystems
own (cluster, sync, compression, aggregation, privacy, scheduling, telemetry) live here too so that one
YAML file and one ``--set`` syntax drive everything.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base of every config section: unknown keys are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


ModelPreset = Literal["gpt-tiny", "gpt-small", "gpt2-124m", "hf-gpt2", "hf-bert-mlm", "custom"]


class ModelConfig(Section):
    """Model architecture. A preset fills every shape; explicit fields override the preset's values."""

    preset: ModelPreset = "gpt-tiny"
    n_layer: int | None = Field(default=None, ge=1, le=96)
    n_head: int | None = Field(default=None, ge=1, le=128)
    n_embd: int | None = Field(default=None, ge=8, le=16384)
    block_size: int | None = Field(default=None, ge=2, le=8192, description="context length in tokens")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = True
    mlm_probability: float = Field(default=0.15, gt=0.0, lt=1.0, description="masking rate for BERT MLM")

    @model_validator(mode="after")
    def _custom_needs_shapes(self) -> ModelConfig:
        if self.preset == "custom" and None in (self.n_layer, self.n_head, self.n_embd, self.block_size):
            raise ValueError("model.preset 'custom' needs n_layer, n_head, n_embd and block_size")
        if self.n_embd is not None and self.n_head is not None and self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        return self


CorpusName = Literal["python-stdlib", "files", "tinyshakespeare", "wikitext2"]
TokenizerKind = Literal["byte", "char", "bpe"]


class DataConfig(Section):
    """Corpus, tokenizer and split. ``python-stdlib`` needs no files and no network."""

    corpus: CorpusName = "python-stdlib"
    path: str | None = Field(
        default=None,
        description="files: a text file or a directory; tinyshakespeare/wikitext2: a local copy "
        "(file or directory). Unset: python-stdlib is found at run time, the others are downloaded.",
    )
    glob: str = Field(default="**/*.txt", description="file pattern when path is a directory (corpus=files)")
    max_bytes: int | None = Field(
        default=3_000_000, ge=1024, description="cap on corpus size in bytes (keeps start-up fast)"
    )
    train_split: str = Field(default="train", description="wikitext2 split to train on (train/valid/test)")
    val_split: str | None = Field(
        default=None,
        description="wikitext2 split to evaluate on; unset: the last val_fraction of the training text",
    )
    val_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    tokenizer: TokenizerKind = "byte"
    vocab_size: int = Field(default=4096, ge=260, le=262_144, description="BPE vocabulary size")
    shard_tokens: int = Field(default=65_536, ge=256, description="tokens per shard (a schedulable task)")
    cache_dir: str = Field(default=".cache/dist-llm-train", description="downloads, tokenizers, token arrays")


class TrainingConfig(Section):
    """Optimisation and evaluation of one training process (the baseline every distributed run meets)."""

    seed: int = 1337
    max_steps: int = Field(default=600, ge=1)
    batch_size: int = Field(default=16, ge=1)
    grad_accum_steps: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    min_lr: float = Field(default=1e-4, ge=0.0)
    warmup_steps: int = Field(default=50, ge=0)
    lr_decay_steps: int | None = Field(default=None, ge=1, description="cosine length; unset: max_steps")
    weight_decay: float = Field(default=0.1, ge=0.0)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.99, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(default=1.0, gt=0.0, description="global norm clip; unset: none")
    eval_interval: int = Field(default=100, ge=1)
    eval_batches: int = Field(default=20, ge=1)
    checkpoint_interval: int | None = Field(default=None, ge=1, description="unset: only at the end")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; unset: torch's default")
    run_dir: str | None = Field(
        default=None, description="where metrics, config and checkpoints go; unset: runs/<name>-<time>"
    )

    @model_validator(mode="after")
    def _lr_order(self) -> TrainingConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"training.min_lr ({self.min_lr}) must not exceed training.lr ({self.lr})")
        return self


class CompressionConfig(Section):
    """Update codec (see :func:`dist_llm_train.compression.build_codec`)."""

    codec: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)
    error_feedback: bool = True


class AggregationConfig(Section):
    """Aggregation rule and pre-aggregators (see :func:`dist_llm_train.aggregation.build_aggregator`)."""

    rule: str = "mean"
    f: int = Field(default=0, ge=0, description="declared number of Byzantine inputs per aggregation")
    params: dict[str, Any] = Field(default_factory=dict)
    pre: list[str] = Field(default_factory=list, description="pre-aggregators in order, e.g. [nnm]")
    pre_params: dict[str, dict[str, Any]] = Field(default_factory=dict)


class PrivacyConfig(Section):
    """Differential privacy. ``worker``: clip each update, noise once per aggregation (DP-FedAvg)."""

    mode: Literal["none", "worker", "example"] = "none"
    clip_norm: float = Field(default=1.0, gt=0.0)
    noise_multiplier: float | None = Field(default=None, ge=0.0)
    target_epsilon: float | None = Field(default=None, gt=0.0)
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _noise_given(self) -> PrivacyConfig:
        if self.mode == "worker" and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("privacy.mode 'worker' needs privacy.noise_multiplier or privacy.target_epsilon")
        return self


class SyncConfig(Section):
    """How updates become model versions: sync, async (bounded staleness), adaptive, local-sgd.

    Symptoms and settings: many ``too-stale`` rejections of slow workers → ``adaptive`` mode or a larger
    ``max_staleness``; loss noisy or diverging under asynchrony → smaller ``max_staleness``, the ``inverse``
    policy, or a larger ``buffer_size``; sync rounds waiting on one slow worker → ``quorum`` below the
    worker count with a ``straggler_timeout_s``; asynchronous runs converging behind the synchronous one
    although few updates are rejected → ``lookahead`` 1 (gradients computed where the update will land);
    staleness p50 of 1 or more with workers of similar speed and a ``buffer_size`` near their count →
    ``step_wait`` (a worker waits briefly for the step its peers are about to complete).
    """

    mode: Literal["sync", "async", "adaptive", "local-sgd"] = "sync"
    quorum: int | None = Field(default=None, ge=1, description="sync: updates per step; unset: all workers")
    straggler_timeout_s: float | None = Field(default=None, gt=0.0)
    max_staleness: int = Field(
        default=4, ge=0, description="async bound; adaptive: the bound of fast workers"
    )
    adaptive_margin: float = Field(
        default=1.5, ge=1.0, description="adaptive: bound = margin x a worker's measured natural staleness"
    )
    adaptive_max_staleness: int = Field(default=64, ge=0, description="adaptive: no bound exceeds this")
    staleness_policy: Literal["none", "inverse", "exponential"] = "inverse"
    staleness_alpha: float = Field(
        default=0.5, gt=0.0, description="exponential policy: weight exp(-alpha tau)"
    )
    buffer_size: int = Field(default=1, ge=1, description="async: updates aggregated per server step")
    local_steps: int = Field(default=20, ge=1, description="local-sgd: inner steps H")
    outer_lr: float = Field(default=0.7, gt=0.0)
    outer_momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    server_optimizer: Literal["sgd", "nesterov", "adamw"] = Field(
        default="adamw",
        description="how aggregated gradients move the parameters (local-sgd: outer nesterov)",
    )
    server_lr: float | None = Field(
        default=None, gt=0.0, description="unset: training.lr (adamw) or outer_lr (local-sgd)"
    )
    server_momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="sgd/nesterov momentum")
    worker_momentum: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="workers send m = beta m + (1-beta) g (robustness: 0.9)"
    )
    lookahead: float = Field(
        default=0.0,
        ge=0.0,
        le=4.0,
        description=(
            "async/adaptive: compute each gradient at θ + lookahead · s · v, where v is the parameters' "
            "last per-version change and s the worker's recent staleness (DANA-style delay compensation); "
            "0 turns it off, 1 aims at the version the update will meet"
        ),
    )
    step_wait: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description=(
            "async/adaptive: a worker asking for a task while the buffer is part-filled, and the workers "
            "still computing can fill it, waits up to this fraction of its mean task time for that step, "
            "so its gradient starts from the new version; 0 hands out the current version at once "
            "(the controller caps a wait at 10 s, below the workers' reply timeout)"
        ),
    )
    history: int = Field(default=64, ge=1, description="parameter versions kept for deltas and staleness")
    worker_optimizer: Literal["none", "adamw"] = Field(
        default="none",
        description=(
            "gradient modes: 'none' pushes gradients for the server optimiser; 'adamw' takes local_steps "
            "AdamW steps on the worker and pushes the parameter change (server_optimizer sgd or nesterov)"
        ),
    )

    @property
    def local_updates(self) -> bool:
        """Whether workers push parameter changes of local AdamW steps rather than gradients."""
        return self.mode == "local-sgd" or self.worker_optimizer == "adamw"

    def steps_per_update(self, grad_accum_steps: int) -> int:
        """Micro-batches one update trains on: the inner steps of local updates, else the accumulation."""
        return self.local_steps if self.local_updates else grad_accum_steps

    @model_validator(mode="after")
    def _worker_optimizer_fits(self) -> SyncConfig:
        if self.worker_optimizer == "adamw" and self.mode != "local-sgd" and self.server_optimizer == "adamw":
            raise ValueError(
                "sync.worker_optimizer='adamw' pushes parameter changes, which the server should apply, not "
                "re-normalise: set sync.server_optimizer=sgd (with sync.server_momentum=0 the server adds "
                "the aggregated change; sync.server_lr defaults to 1) or nesterov"
            )
        return self


class ClusterConfig(Section):
    """Workers of a run (the local launcher and the simulator)."""

    workers: int = Field(default=4, ge=1)
    speeds: list[float] | None = Field(default=None, description="relative speed per worker")
    byzantine: int = Field(default=0, ge=0)
    attack: str | None = None
    attack_params: dict[str, Any] = Field(default_factory=dict)
    topology: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ClusterConfig:
        if self.speeds is not None and len(self.speeds) != self.workers:
            raise ValueError(
                f"cluster.speeds has {len(self.speeds)} entries but cluster.workers is {self.workers}"
            )
        if self.byzantine > self.workers:
            raise ValueError(f"cluster.byzantine ({self.byzantine}) exceeds cluster.workers ({self.workers})")
        return self


class SchedulingConfig(Section):
    scheduler: Literal["stable-matching", "priority", "capability"] = "capability"
    lease_s: float = Field(default=60.0, gt=0.0)
    heartbeat_interval_s: float = Field(default=2.0, gt=0.0)
    failure_detector: Literal["timeout", "phi-accrual"] = "timeout"
    failure_timeout_s: float = Field(default=6.0, gt=0.0)
    min_workers: int = Field(
        default=1,
        ge=1,
        description=(
            "the controller hands out no task until this many workers have registered with it, at start "
            "and again after --resume; raise it when the first worker to arrive runs ahead of the others"
        ),
    )


class TelemetryConfig(Section):
    log_interval: int = Field(default=10, ge=1, description="steps between metric lines")
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    progress: bool = True


class RunConfig(Section):
    """A complete run: what to train, on what, how, and across which workers."""

    name: str = "default"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    @model_validator(mode="after")
    def _min_workers_within_cluster(self) -> RunConfig:
        # A gate no run can open would leave the controller waiting for ever.
        if self.scheduling.min_workers > self.cluster.workers:
            raise ValueError(
                f"scheduling.min_workers ({self.scheduling.min_workers}) exceeds cluster.workers "
                f"({self.cluster.workers}): lower min_workers or raise cluster.workers"
            )
        return self
