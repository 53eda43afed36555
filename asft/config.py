"""One typed configuration for the whole pipeline.

Every setting lives here exactly once. ``params.yaml`` at the repository root holds the values;
the CLI, the Prefect flows and the DVC stages all read it through :func:`load_config`, and
``key=value`` overrides (dotted paths, YAML-typed values) are applied on top.

Each field is documented; ``asft config --show`` prints the resolved configuration.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from asft.data.paths import ROOTS_ENV, require_data_root, resolve_inside
from asft.posttrain.registry import method_names


class ConfigError(ValueError):
    """A configuration file or override is invalid. The message names the file and the key."""


def _registered(name: str, registry, kind: str) -> str:
    """A name that selects registered code: unknown names fail when the config loads, listing the valid ones."""
    if name not in registry:
        raise ValueError(f"unknown {kind} '{name}'; registered: {', '.join(sorted(registry))}")
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the interaction log comes from and how to read it.

    Paths are contained: ``source`` must resolve inside the project, ``../shared/data`` or a directory
    listed in the environment variable ``ASFT_DATA_ROOTS``; the files named below must resolve inside
    ``source`` (no absolute paths, no ``..`` or symlink escapes)."""

    source: str = Field(
        "simulator",
        description="'simulator' for the built-in simulator, or a path to a data directory or file. It must"
        f" resolve (after '..' and symlinks) inside the project root, ../shared/data or a directory listed in"
        f" the environment variable {ROOTS_ENV} (os.pathsep-separated).",
    )
    format: Literal["auto", "movielens-100k", "movielens-dat", "movielens-csv", "recbole", "generic"] = Field(
        "auto", description="Input format; 'auto' detects it from the files in the directory."
    )
    interactions_file: str | None = Field(
        None, description="generic/recbole format: interactions file (CSV or Parquet), a path relative to"
        " `source` that must stay inside it (absolute paths and '..'/symlink escapes are refused)."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="generic format: canonical column -> source column (user_id, item_id, timestamp, rating).",
    )
    order_column: str | None = Field(
        None, description="generic format: column giving the event order when there is no timestamp."
    )
    items_file: str | None = Field(None, description="generic format: optional item catalog file, relative to"
                                   " `source` and inside it like `interactions_file`.")
    item_columns: dict[str, str] = Field(
        default_factory=dict, description="generic format: canonical catalog column -> source column."
    )
    sep: str | None = Field(None, description="generic format: CSV delimiter, one character (default ',').")

    @field_validator("source")
    @classmethod
    def _source_contained(cls, v: str) -> str:
        if v != "simulator":
            require_data_root(v, "data.source")
        return v

    @field_validator("interactions_file", "items_file")
    @classmethod
    def _file_inside_source(cls, v: str | None, info: ValidationInfo) -> str | None:
        source = info.data.get("source")
        if v is None or source is None or source == "simulator":
            return v
        src = Path(source)
        try:
            base = src.parent if src.is_file() else src
        except (OSError, ValueError):
            base = src
        resolve_inside(base, v, f"data.{info.field_name}")
        return v

    @field_validator("sep")
    @classmethod
    def _one_char(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 1 or v in "\r\n\"\x00"):
            raise ValueError(f"data.sep must be a single character other than a quote, NUL or newline, got {v!r}")
        return v


class SimulatorConfig(_Section):
    """The built-in simulator: the embedded default data source. Seeded and deterministic."""

    n_users: int = Field(800, ge=2, description="Number of simulated users.")
    n_items: int = Field(400, ge=10, description="Catalog size.")
    dim: int = Field(8, ge=1, description="Dimension of latent user tastes and item features.")
    min_len: int = Field(20, ge=3, description="Shortest simulated history.")
    max_len: int = Field(60, ge=3, description="Longest simulated history.")
    popularity_alpha: float = Field(1.0, ge=0, description="Zipf exponent of item popularity.")
    exposure_bias: float = Field(
        1.0, ge=0, description="Weight of log-popularity in the logging policy (exposure/popularity bias)."
    )
    logging_temperature: float = Field(
        0.5, gt=0, description="Temperature of the logging policy's softmax over true utility."
    )
    taste_drift: float = Field(
        0.15, ge=0, le=1, description="How far a user's taste moves toward each consumed item."
    )
    rating_noise: float = Field(0.5, ge=0, description="Std of Gaussian noise added before rounding ratings.")
    start_timestamp: int = Field(1_600_000_000, description="Timestamp of the first event (seconds).")
    workers: int = Field(
        0, ge=0, description="Processes that simulate blocks of 2,048 users at once (0 = one per available CPU"
        " core). The log does not depend on it.")


class PreprocessConfig(_Section):
    """Turning raw interactions into token sequences and a leave-one-out split."""

    user_core: int = Field(0, ge=0, description="k-core filter: keep users with at least this many events (0 = off).")
    item_core: int = Field(0, ge=0, description="k-core filter: keep items with at least this many events (0 = off).")
    min_user_events: int = Field(
        3,
        ge=3,
        description="Users with fewer events are dropped: leave-one-out needs >= 1 train, 1 valid, 1 test item.",
    )
    max_len: int = Field(50, ge=2, description="Maximum input sequence length (most recent items kept).")
    dedupe_consecutive: bool = Field(False, description="Drop an event that repeats the user's previous item.")
    train_windows: Literal["all", "last"] = Field(
        "all",
        description="'all' cuts long training sequences into consecutive windows of max_len+1 tokens so every"
        " training event is a target exactly once; 'last' keeps only the most recent max_len+1 events.",
    )
    window_stride: int = Field(
        25,
        ge=0,
        description="Stride between consecutive training windows (0 = max_len, no overlap). With a smaller"
        " stride windows overlap and only the targets a window adds are scored, so each target is still"
        " counted once but sees at least max_len - stride items of context (as at evaluation).",
    )


class ModelConfig(_Section):
    """The base generative recommender: a decoder-only transformer over item tokens (GPT-2 blocks)."""

    n_layer: int = Field(2, ge=1, description="Transformer blocks.")
    n_head: int = Field(2, ge=1, description="Attention heads.")
    n_embd: int = Field(64, ge=8, description="Hidden size; item embeddings are tied to the output layer.")
    backbone: Literal["gpt2", "llama"] = Field(
        "gpt2", description="Transformer blocks, built from a `transformers` config: 'gpt2' (learned positions,"
        " LayerNorm, GELU MLP; dropout on embeddings, residuals and attention, as SASRec) or 'llama' (RoPE,"
        " RMSNorm, SwiGLU; `dropout` applies to attention only, as Llama has no other dropout)."
    )
    dropout: float = Field(0.3, ge=0, lt=1, description="Dropout on embeddings, residuals and attention.")
    n_positions: int | None = Field(None, description="Position table size; defaults to preprocess.max_len.")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        return self


class TrainConfig(_Section):
    """Next-item SFT (behaviour cloning) of the base model."""

    epochs: int = Field(30, ge=1, description="Maximum epochs.")
    batch_size: int = Field(64, ge=1, description="Sequences per optimizer step (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases/LayerNorm).")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps, then `lr_schedule`.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="After warmup: 'constant', or 'cosine'/'linear' decay to min_lr_ratio x lr at the"
        " last step of `epochs` (early stopping may end the run before).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate of a decaying schedule, as a"
                                " share of `lr`.")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm (0 = off).")
    eval_every: int = Field(1, ge=1, description="Evaluate on validation every N epochs.")
    eval_steps: int = Field(0, ge=0, description="Also evaluate every N optimizer steps inside an epoch (0 = epoch"
                            " ends only); early stopping and model choice consider every evaluation.")
    eval_at_start: bool = Field(False, description="Evaluate the initial model before the first update, so that"
                                " model choice may return it unchanged (post-training: pi_ref itself).")
    patience: int = Field(5, ge=1, description="Early stopping: evaluations without validation improvement.")
    monitor: str = Field("ndcg@10", description="Validation metric for early stopping and checkpoint choice.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'. Multi-GPU: see README.")
    num_threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch default).")
    checkpoint_every: int = Field(1, ge=1, description="Write a resumable checkpoint every N epochs.")
    checkpoint_steps: int = Field(
        0, ge=0, description="Also write one every N optimizer steps inside an epoch (0 = epoch ends only); a "
        "resumed run restarts at that step with the same data order, so it ends where an uninterrupted run would."
    )


class BaseTrainConfig(TrainConfig):
    """Next-item SFT of the base model: the trainer's fields plus the objective's. The defaults are the
    settings shared by the best trials of `asft tune` on ML-100K (cosine decay, label smoothing)."""

    epochs: int = Field(40, ge=1, description="Maximum epochs (the cosine decay spans them).")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "cosine", description="After warmup: 'constant', or 'cosine'/'linear' decay to min_lr_ratio x lr at the"
        " last step of `epochs` (early stopping may end the run before).")
    patience: int = Field(8, ge=1, description="Early stopping: evaluations without validation improvement.")
    mask_history: bool = Field(
        True, description="Train the history-masked next-item policy: items the user already consumed (in the"
        " window or before it) are excluded from the training softmax, as they are at evaluation and serving"
        " (a repeated target stays valid). false = the plain full softmax over the catalog.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the next-item cross-entropy,"
                                   " spread over the items the softmax allows.")
    softmax: Literal["full", "sampled", "auto"] = Field(
        "auto", description="Next-item softmax of base training: 'full' over the whole catalog, 'sampled' over the"
        " target plus `negatives` shared negatives per micro-batch (logQ-corrected, history-masked like the full"
        " one), 'auto' = sampled when the catalog has at least `sampled_softmax_min_items` items.")
    sampled_softmax_min_items: int = Field(
        20000, ge=1, description="softmax=auto: catalogs of at least this many items train with the sampled"
        " softmax (below it the full softmax is affordable and, on ML-100K and Beauty, at least as good).")
    negatives: int = Field(256, ge=1, description="Sampled softmax: negatives drawn per micro-batch from"
                           " `negative_sampler` (shared by its rows; with in_batch_negatives up to as many again).")
    negative_sampler: Literal["uniform", "popularity"] = Field(
        "popularity", description="Sampled softmax: draw negatives by their frequency as training targets"
        " (add-one smoothed), or uniformly over items. With the logQ correction popularity negatives give the"
        " gradient closer to the full softmax's (benchmarks/issue15/sampled-softmax.md).")
    in_batch_negatives: bool = Field(
        False, description="Sampled softmax: also use the micro-batch's other targets (up to `negatives` of them,"
        " drawn at random) as negatives (Yi et al. 2019; mixed negative sampling).")
    logq_correction: bool = Field(
        True, description="Sampled softmax: subtract log(expected count) of each negative under the samplers from"
        " its logit, so the loss estimates the full softmax (sampling-bias correction).")


class EvalConfig(_Section):
    """Full-ranking evaluation (METHODS.md section 7)."""

    ks: list[int] = Field(default_factory=lambda: [10, 50], description="Cut-offs for HR@K and NDCG@K.")
    mask_history: bool = Field(True, description="Mask items already in the user's history before ranking.")
    also_unmasked: bool = Field(True, description="Also report test metrics without history masking.")
    batch_size: int = Field(512, ge=1, description="Users scored per forward pass.")
    memory_mb: int = Field(
        1024, ge=16, description="Memory budget of one chunk of full-catalogue scores (users x items): fewer than"
        " `batch_size` users are scored at once when their scores would not fit, so evaluation, candidate"
        " sampling and reward scoring stay bounded at 100k+ items. Results do not depend on it.")

    @field_validator("ks")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(k <= 0 for k in v):
            raise ValueError("eval.ks must be a non-empty list of positive integers")
        return sorted(set(v))


class ValidationConfig(_Section):
    """Great Expectations data checks (raw interactions, processed sequences, preference pairs)."""

    rating_min: float | None = Field(
        None, description="Lowest valid rating (explicit feedback). None: the format's own scale -- MovieLens"
        " u.data / ratings.dat whole stars 1-5, ratings.csv half stars 0.5-5 (values off the half-star grid"
        " fail) -- and 1 for formats that define none (generic, recbole).")
    rating_max: float | None = Field(None, description="Highest valid rating. None: the format's own (5).")
    min_history_mostly: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of raw events that must belong to users with >= preprocess.min_user_events events.",
    )
    allow_duplicate_events: bool = Field(
        False, description="Accept exact duplicate (user_id, item_id, timestamp) rows in the raw log."
    )
    min_source_share: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Preference pairs: every enabled source must supply at least this share of the pairs.",
    )
    sample_rows: int = Field(10, ge=1, description="Failing rows quoted per expectation in a failure summary.")
    data_docs: bool = Field(True, description="Build the GX data docs (HTML) next to each validated dataset.")


class JudgeConfig(_Section):
    """Simulated judges (simulator only): true utility plus configurable annotation noise (METHODS.md 3)."""

    n_judges: int = Field(20, ge=1, description="Number of simulated annotators.")
    noise: float = Field(0.3, ge=0, description="Std of Gaussian noise added to the true utility per judgment.")
    flip_prob: float = Field(0.05, ge=0, le=0.5, description="Probability that a pairwise label is flipped.")
    position_bias: float = Field(
        0.1, ge=0, le=1, description="Probability that a judge picks the first-presented option regardless."
    )
    lazy_share: float = Field(0.1, ge=0, le=1, description="Share of judges who answer at random (lazy).")
    honeypot_rate: float = Field(
        0.1, ge=0, le=1, description="Share of each judge's tasks that are honeypots with a known answer."
    )
    honeypot_min_accuracy: float = Field(
        0.8, ge=0, le=1, description="Judges below this honeypot accuracy are dropped with all their pairs."
    )


class PreferenceConfig(_Section):
    """Building (context, chosen, rejected) preference pairs from the training part of the logs."""

    sources: list[Literal["explicit", "implicit", "ranking", "best_of_n", "pairwise"]] | Literal["auto"] = Field(
        "auto",
        description="Pair sources. 'auto': explicit (if ratings) + implicit, plus the judge sources"
        " ranking, best_of_n and pairwise on the simulator.",
    )
    contexts_per_user: int = Field(8, ge=1, description="Context prefixes sampled per user.")
    min_context: int = Field(2, ge=1, description="Shortest context (items of history).")
    horizon: int = Field(5, ge=2, description="Explicit pairs: the user's next items compared within the context.")
    implicit_negatives: int = Field(2, ge=1, description="Implicit pairs: negatives per consumed item.")
    popularity_bins: int = Field(10, ge=1, description="Implicit negatives come from the positive's popularity bin.")
    ranking_size: int = Field(4, ge=2, description="Judge ranking tasks: items ranked (all N(N-1)/2 pairs).")
    best_of_n: int = Field(4, ge=2, description="Judge best-of-N tasks: items shown (N-1 pairs).")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    extra_pairs_file: str | None = Field(
        None,
        description="Optional CSV/Parquet of externally collected judgments (e.g. human assessors), merged as"
        " source 'human' (or the file's `source` column) and validated like every other pair. Columns: user_id,"
        " context_end (the context is the user's first context_end events), chosen_item, rejected_item"
        " (raw item ids), optional source and margin. Like data.source it must resolve inside the project,"
        f" ../shared/data or a directory in {ROOTS_ENV}.",
    )
    valid_share: float = Field(0.1, ge=0, lt=0.5, description="Share of users whose pairs form the valid split.")
    test_share: float = Field(0.1, ge=0, lt=0.5, description="Share of users whose pairs form the test split.")

    @field_validator("extra_pairs_file")
    @classmethod
    def _pairs_contained(cls, v: str | None) -> str | None:
        if v is not None:
            require_data_root(v, "preferences.extra_pairs_file")
        return v


class RewardTrainConfig(TrainConfig):
    """Optimisation of each reward-model member: the base trainer's fields with reward defaults.

    ``batch_size`` counts contexts (each with all its pairs); ``monitor`` is a validation pair metric:
    ``neg_bt_loss``, ``pair_acc`` or ``auc``."""

    epochs: int = Field(15, ge=1, description="Maximum epochs over the training contexts.")
    batch_size: int = Field(256, ge=1, description="Contexts (with all their pairs) per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps, then constant.")
    patience: int = Field(2, ge=1, description="Early stopping: evaluations without validation improvement"
                          " (2: the same chosen members as 3 on the simulator, 12 % fewer epochs).")
    monitor: Literal["neg_bt_loss", "pair_acc", "auc"] = Field(
        "neg_bt_loss", description="Validation pair metric for early stopping (higher is better)."
    )


class RewardConfig(_Section):
    """Bradley-Terry reward model ensemble (METHODS.md section 4)."""

    members: int = Field(3, ge=1, description="Ensemble size K.")
    bootstrap: bool = Field(True, description="Each member trains on a bootstrap resample of the train contexts.")
    head_init_scale: float = Field(
        0.0,
        ge=0,
        description="Initial reward head = scale * identity projection: 0 starts at zero reward, 1 at the base"
        " model's logits.",
    )
    rating_head: bool = Field(True, description="Add a pointwise head regressing explicit ratings (MSE).")
    rating_weight: float = Field(0.1, ge=0, description="Weight of the rating MSE next to the Bradley-Terry loss.")
    kappa: float = Field(1.0, ge=0, description="Pessimistic reward = mean - kappa * std over members.")
    centring_contexts: int = Field(
        512, ge=1, description="Training contexts scored over the whole catalog to compute centring statistics."
    )
    fold: int = Field(0, ge=-1, le=1, description="Preference fold (users) the training ensemble learns from;"
                      " -1 = both. The other fold trains the held-out judge (see `judge`).")
    train: RewardTrainConfig = Field(default_factory=RewardTrainConfig, description="Optimisation of each member.")


class JudgeEnsembleConfig(_Section):
    """The held-out reward ensemble that judges post-trained policies (METHODS.md section 7).

    Trained like the training ensemble but on the other data half (``fold``) with other seeds, and
    never used for training, early stopping or selection."""

    members: int = Field(2, ge=1, description="Members of the judge ensemble.")
    fold: int = Field(1, ge=0, le=1, description="Preference fold the judge trains on (the training ensemble"
                      " uses reward.fold; the two must differ).")
    seed_offset: int = Field(7919, ge=1, description="Added to the global seed for the judge's member seeds.")


class SamplingConfig(_Section):
    """Candidate sampling from pi_ref (METHODS.md section 5, data option b)."""

    n_candidates: int = Field(8, ge=1, description="N: distinct candidates per context, drawn without replacement.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature applied to pi_ref's logits.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely items before sampling (0 = off; must"
                       " be >= n_candidates).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus: keep the smallest set with this much mass"
                         " (always at least n_candidates items).")
    mask_history: bool = Field(True, description="Never sample an item the user already consumed.")
    batch_size: int = Field(64, ge=1, description="Training windows per forward pass.")
    memory_mb: int = Field(
        1024, ge=16, description="Memory budget of one chunk of per-position catalogue scores (windows x positions x"
        " items): a batch is processed in fewer windows at a time when its scores would not fit (100k+ items)."
        " The draws do not depend on it on CPU (the same random stream, consumed in the same order).")
    slates_per_user: int = Field(0, ge=0, description="Also write this many autoregressive slates per user"
                                 " (validation context, KV cache) to slates.parquet (0 = off).")
    slate_size: int = Field(10, ge=1, description="K: items per slate.")


class AdvantageConfig(_Section):
    """Advantages and weights for A-SFT (estimators and transforms are registered by name in
    :mod:`asft.advantages`)."""

    reward: Literal["mean", "pessimistic"] = Field(
        "pessimistic", description="Ensemble score used as r(s,a): mean, or mean - reward.kappa * std.")
    baseline: str = Field("mean", description="b(s): 'mean' of the N candidates, 'loo' (leave-one-out mean),"
                          " 'expectation' (exact E_pi_ref[r]) or 'none'.")
    transform: str = Field("exp", description="Weight transform: 'exp' (global exp(A/lambda), clipped and"
                           " normalised), 'softmax' (per context over the candidates), 'linear', 'top_q', 'ones'.")
    lam: float = Field(1.5, gt=0, description="lambda, the KL temperature: w = exp(A/lambda).")
    standardize: bool = Field(True, description="Divide A by its global std first, so lambda is in units of"
                              " advantage std and comparable across reward models.")
    w_max: float = Field(20.0, gt=0, description="Clip global weights at w_max (before normalisation to mean 1).")
    top_q: float = Field(0.25, gt=0, le=1, description="'top_q': keep the top q share of candidates by reward.")

    @field_validator("baseline")
    @classmethod
    def _known_baseline(cls, v: str) -> str:
        from asft.advantages import BASELINES

        return _registered(v, BASELINES, "advantage baseline")

    @field_validator("transform")
    @classmethod
    def _known_transform(cls, v: str) -> str:
        from asft.advantages import TRANSFORMS

        return _registered(v, TRANSFORMS, "weight transform")


class DPOConfig(_Section):
    """DPO / IPO on pairs of sampled candidates ranked by the reward ensemble."""

    beta: float = Field(0.1, gt=0, description="beta of DPO (and 1/(2 beta) target margin of IPO).")
    z: float = Field(1.0, ge=0, description="Pairs are kept only where [mean -/+ z*std] intervals do not overlap.")
    pairs_per_context: int = Field(2, ge=1, description="Pairs taken per context (best vs worst first).")


class PolicyGradientConfig(_Section):
    """RLOO / GRPO (and Rec-R1) with the KL term added to the loss."""

    group_size: int = Field(8, ge=2, description="G: actions sampled from the current policy per context.")
    clip: float = Field(0.2, gt=0, description="PPO ratio clip.")
    kl_coef: float = Field(0.05, ge=0, description="beta: weight of the KL to pi_ref, added to the loss.")
    kl_estimator: Literal["k3", "exact"] = Field(
        "k3", description="'k3': exp(q)-q-1 at the sampled actions; 'exact': KL(pi || pi_ref) over the whole"
        " (history-masked) catalogue at each context, from the full log-probabilities already computed.")
    ppo_epochs: int = Field(
        1, ge=1, description="Optimisation passes over each batch of sampled actions: pass 1 draws them from the"
        " current policy (pi_old) and every pass weighs them by rho = pi / pi_old, so from pass 2 on the PPO clip"
        " can bind (its rate is logged as clip_frac).")
    entropy_coef: float = Field(0.01, ge=0, description="Entropy bonus (subtracted from the loss).")
    std_eps: float = Field(1e-6, gt=0, description="GRPO: advantage = (R - mean) / (std + eps).")


class RecR1Config(_Section):
    """Rec-R1-style GRPO: reward = NDCG@K of a sampled slate against the user's real next items."""

    slate_size: int = Field(10, ge=1, description="K: slate length (Plackett-Luce sample of the next-item policy).")
    horizon: int = Field(5, ge=1, description="The user's next training items that count as relevant.")


class RFTConfig(_Section):
    """Rejection-sampling fine-tuning (best-of-N), iterated with a rising threshold."""

    keep_fracs: list[float] = Field(
        default_factory=lambda: [0.5, 0.25],
        description="Top share of each context's candidates kept in each round; one round per entry, each"
        " re-sampling from the current policy (round 1 uses the pi_ref candidates).",
    )


class PostTrainTrainConfig(TrainConfig):
    """Optimisation shared by every post-training method (same compute budget for all)."""

    epochs: int = Field(4, ge=1, description="Maximum epochs over the training contexts.")
    lr: float = Field(5e-4, gt=0, description="AdamW peak learning rate.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps, then constant.")
    patience: int = Field(6, ge=1, description="Early stopping: evaluations without validation improvement.")
    eval_steps: int = Field(5, ge=0, description="Also evaluate every N optimizer steps inside an epoch: one epoch"
                            " can move the policy past the NDCG guard, and selection needs a checkpoint inside it"
                            " (0 = epoch ends only).")
    eval_at_start: bool = Field(True, description="Evaluate pi_ref before the first update: selection returns pi_ref"
                                " itself when no evaluated checkpoint beats it (or all fail the NDCG guard).")
    monitor: str = Field(
        "selection",
        description="Validation metric for early stopping: 'selection' is the training ensemble's pessimistic"
        " reward of the top-10, counted only while valid NDCG@10 >= (1 - ndcg_tolerance) x the base's.",
    )


POSTTRAIN_METHODS = method_names()  # registered in asft/posttrain/registry.py (verl-style, by name)


class PostTrainConfig(_Section):
    """Post-training of pi_ref: A-SFT and the baselines, on the same contexts and budget (METHODS.md 5-6)."""

    methods: list[str] = Field(
        default_factory=lambda: ["asft", "sft", "dpo", "grpo"],
        description="Methods run by `retrain`, each a nested MLflow run: " + ", ".join(POSTTRAIN_METHODS) + ".",
    )
    mask_history: bool = Field(True, description="Weighted and pairwise methods fit the history-masked policy (the"
                               " distribution candidates are sampled from and recommendations are made from).")
    anchor_weight: float = Field(4.0, ge=0, description="Candidate-based methods (asft, asft_mix, rft, rft_asft):"
                                 " plain-SFT anchor on the logged next item, with this weight per context next to"
                                 " the N candidates whose weights average 1 (0 = off).")
    anchor_scope: Literal["candidates", "all"] = Field(
        "candidates", description="Which methods get the anchor: 'candidates' (those above and asft_full,"
        " anchor_only) or 'all' (also DPO/IPO and RLOO/GRPO/Rec-R1, as an added plain-SFT term on the logged item"
        " with coefficient anchor_weight / (n_candidates + anchor_weight), the anchor's share of the weighted"
        " loss; sft, rwr and asft_logged train on logged items already).")
    ndcg_tolerance: float = Field(0.03, ge=0, le=1, description="Selection guard: valid NDCG@10 may drop at most"
                                  " this share below the base model's.")
    champion_method: str = Field("asft", description="The method whose model `retrain` registers (champion or"
                                 " challenger, see `registry`).")
    lambda_sweep: list[float] = Field([], description="Extra A-SFT runs at these `advantage.lam` values (besides the"
                                      " configured one) for the lambda frontier plot (judged reward vs KL); each is"
                                      " a nested run `posttrain-asft` with its own lambda. Never registered.")
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    pg: PolicyGradientConfig = Field(default_factory=PolicyGradientConfig)
    rec_r1: RecR1Config = Field(default_factory=RecR1Config)
    rft: RFTConfig = Field(default_factory=RFTConfig)
    train: PostTrainTrainConfig = Field(default_factory=PostTrainTrainConfig)

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in method_names()]
        if bad:
            raise ValueError(f"unknown post-training method(s) {bad}; registered: {', '.join(method_names())}")
        if len(set(v)) != len(v):
            raise ValueError("posttrain.methods lists a method twice")
        return v

    @field_validator("champion_method")
    @classmethod
    def _known_champion(cls, v: str) -> str:
        return _registered(v, method_names(), "post-training method")


class TrackingConfig(_Section):
    """MLflow tracking and Prefect settings."""

    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI. None: env MLFLOW_TRACKING_URI if set, else a local SQLite store"
        " `mlflow.db` in the working directory.",
    )
    artifact_root: str | None = Field(
        None, description="Artifact location for a new experiment (None: `mlartifacts/` next to the SQLite store)."
    )
    experiment: str = Field("asft-retrain", description="MLflow experiment name.")
    enabled: bool = Field(True, description="Log to MLflow at all (stage commands may turn it off).")


class RegistryConfig(_Section):
    """MLflow Model Registry: registered models, aliases and the promotion gate."""

    enabled: bool = Field(True, description="Register the models of every successful retrain (audit re-runs never do).")
    recommender_model: str = Field("asft-recommender", description="Registered name of the generative recommender"
                                   " (the post-trained `posttrain.champion_method` policy, a pyfunc serving top-K).")
    reward_model: str = Field("asft-reward", description="Registered name of the reward ensemble (pyfunc scoring"
                              " candidate items for a history); promoted together with the recommender it trained.")
    ndcg_tolerance: float = Field(0.01, ge=0.0, description="The new model may trail the champion's validation"
                                  " NDCG@10 by at most this much (absolute) and still be promoted.")
    judged_margin: float = Field(0.0, description="...and must beat the champion's held-out judged reward of the"
                                 " valid top-10 by more than this.")
    serve_k: int = Field(10, ge=1, description="Default number of recommendations the served model returns.")
    serve_max_rows: int = Field(1024, ge=1, description="Most rows (histories) one request to a served model may"
                                " carry; a larger request is refused with HTTP 400.")
    serve_max_history: int = Field(10_000, ge=1, description="Most item ids in one history (or candidate list) of"
                                   " a request to a served model (HTTP 400 above it); the recommender reads only"
                                   " the last `preprocess.max_len` of them.")
    reuse_champion_base: bool = Field(True, description="Reuse the champion's base model (downloaded from MLflow)"
                                      " when its data hash, params and code version equal this run's.")
    product: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="The product (dataset lineage) the registered models belong to: the names become"
        " `<recommender_model>-<product>` and `<reward_model>-<product>`, each with its own champion, and the gate"
        " only compares models of one product. None = derived per run: 'simulator' or the dataset directory's"
        " name, plus the catalog fingerprint (first 8 hex of the sha256 of the item ids), so datasets and"
        " catalogs never share a lineage. Name it in production for stable serving names.")
    catalog_change: Literal["challenger", "champion"] = Field(
        "challenger", description="When the product's champion ranks another catalog than the new model (a named"
        " `product` whose catalog changed), the two are not compared: 'challenger' keeps the champion (promote by"
        " hand), 'champion' lets the newest catalog take over the lineage.")
    gate_timeout_s: float = Field(
        1800, gt=0, description="Time limit of the promote stage: waiting for the promotion gate (one promotion"
        " per product at a time), re-evaluating the champion and registering; past it the run fails.")
    gate_lease_s: float = Field(
        120, ge=60, le=86400, description="With a Prefect server: lease of the gate's global concurrency slot,"
        " renewed while the gate runs; a holder that dies (kill -9, lost pod) frees the slot when its lease"
        " expires.")


class OrchestrationConfig(_Section):
    """How the Prefect flow runs its stages: concurrency of independent stages and time limits."""

    max_parallel: int = Field(2, ge=1, description="Independent stages (the post-training methods, the lambda"
                              " sweep, reward ensemble vs judge) run concurrently, at most this many at once, each"
                              " in its own process; 1 = one after another in the flow's process.")
    data_timeout_s: float = Field(1800, gt=0, description="Time limit of a data stage (ingest, preprocess,"
                                  " preferences, sample, score, advantages); a stage past it fails the run.")
    train_timeout_s: float = Field(6 * 3600, gt=0, description="Time limit of a training stage (also kills a hung"
                                   " torchrun launch).")
    eval_timeout_s: float = Field(3600, gt=0, description="Time limit of an evaluation stage.")
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="Where independent stages run: 'threads' = child processes of the flow's process"
        " (Prefect's thread-pool task runner, `max_parallel` at a time); 'dask' = tasks on a Dask cluster"
        " (prefect-dask's DaskTaskRunner), each stage a child process of the worker that picks it up; the"
        " tuning trials too.")
    dask_address: str | None = Field(
        None, description="Scheduler of an existing Dask cluster (e.g. tcp://10.0.0.5:8786) for"
        " `task_runner: dask`; None = a LocalCluster on this machine for the duration of the run. Workers need"
        " this code, the same data/run paths (a shared filesystem) and the MLflow/Prefect servers.")
    dask_workers: int | None = Field(
        None, ge=1, description="Worker processes of the LocalCluster (`task_runner: dask` without"
        " `dask_address`); None = `max_parallel`.")
    dask_threads_per_worker: int = Field(
        1, ge=1, description="Stages each LocalCluster worker runs at once. Every stage's child process gets the"
        " host's cores divided by the stage slots of all workers on that host.")

    @field_validator("dask_address")
    @classmethod
    def _dask_address(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        host = v.split("://", 1)[-1]
        if "://" in v and not v.startswith(("tcp://", "tls://", "ucx://", "ws://", "wss://")) or not host:
            raise ValueError(f"dask_address {v!r}: expected a scheduler address such as tcp://HOST:8786")
        return v

    def timeout(self, kind: str) -> float:
        return {"data": self.data_timeout_s, "train": self.train_timeout_s, "eval": self.eval_timeout_s}[kind]


class DistributedConfig(_Section):
    """How the flow runs its training, sampling and scoring stages: in its own process, or launched under
    ``torchrun`` as DDP over several local processes/GPUs (multi-node: see infra/k8s/README.md)."""

    nproc_per_node: int = Field(
        1, ge=0, description="Processes per stage on this machine: 1 = in the flow's process; N > 1 = the stage's "
        "CLI command under `torchrun --standalone --nproc_per_node N` (DDP, NCCL on GPUs, gloo on CPU); "
        "0 = one per visible GPU (1 without GPUs). Batch sizes are per process: divide them by N to keep "
        "the single-process global batch."
    )


class StorageConfig(_Section):
    """Where lineage outlives the worker (a pod that dies takes its disk with it): the DVC remote every
    dataset version is pushed to, Prefect's result storage (the stage cache) and the training checkpoints.
    URLs are ``s3://bucket/prefix`` (S3 or an S3-compatible server, ``s3_endpoint_url``) or local/shared
    paths. Credentials never go here: S3 clients read ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
    (or a profile, an IAM role) from the environment."""

    dvc_remote: str | None = Field(
        None, description="DVC remote URL the flow pushes every dataset version to (e.g. s3://bucket/asft/dvc or "
        "/shared/dvc-storage); configured as remote `dvc_remote_name` of the project's DVC repository for the run "
        "(what `dvc remote add` writes) and recorded on the MLflow run. None: the repository's default remote "
        "(.dvc/config), where a failed push only warns.")
    dvc_remote_name: str = Field(
        "asft-remote", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Name of the DVC remote configured from `dvc_remote` (recorded on the run with its URL).")
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible server (MinIO, Ceph, ...: http(s)://host:port) for every "
        "s3:// URL here; None: AWS (or the AWS_ENDPOINT_URL environment variable).")
    results_url: str | None = Field(
        None, description="Prefect result storage of the stage tasks (their cached summaries), e.g. "
        "s3://bucket/asft/results; None: Prefect's local result storage (PREFECT_RESULTS_LOCAL_STORAGE_PATH).")
    checkpoints_url: str | None = Field(
        None, description="Training checkpoints are uploaded here after every checkpoint write and downloaded "
        "when a training stage starts without a local one (a preempted run resumes on another machine), under "
        "the stage's work-directory key, e.g. s3://bucket/asft/checkpoints. None: checkpoints stay local.")

    @field_validator("dvc_remote", "results_url", "checkpoints_url", "s3_endpoint_url")
    @classmethod
    def _url(cls, v: str | None, info) -> str | None:
        if v is None:
            return None
        from urllib.parse import urlsplit

        v = v.strip()
        if not v:
            raise ValueError(f"storage.{info.field_name}: empty URL (use null for none)")
        parts = urlsplit(v)
        if parts.username or parts.password:
            raise ValueError(f"storage.{info.field_name}: credentials do not belong in a URL; set "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment")
        if info.field_name == "s3_endpoint_url":
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"storage.s3_endpoint_url: expected http(s)://host[:port], got {v!r}")
            return v
        if parts.scheme == "s3":
            if not parts.netloc:
                raise ValueError(f"storage.{info.field_name}: {v!r} names no bucket (s3://bucket/prefix)")
            return v.rstrip("/")
        if parts.scheme not in ("", "file"):
            raise ValueError(f"storage.{info.field_name}: unsupported URL scheme {parts.scheme!r} in {v!r} "
                             "(s3://bucket/prefix or a local/shared path)")
        return v


class SearchParam(_Section):
    """One searched setting: a range (``low``..``high``, optionally on a log scale) or ``choices``."""

    type: Literal["float", "int"] = Field("float", description="Value type of a range.")
    low: float | None = Field(None, description="Lowest value of a range.")
    high: float | None = Field(None, description="Highest value of a range.")
    log: bool = Field(False, description="Sample the range on a log scale.")
    choices: list[Any] | None = Field(None, description="Categorical values (instead of a range).")

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchParam:
        if self.choices is None and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError("a searched setting needs `choices` or a range low <= high")
        if self.choices is not None and not self.choices:
            raise ValueError("`choices` must not be empty")
        return self


def _default_space() -> dict[str, SearchParam]:
    return {
        "train.lr": SearchParam(low=3e-4, high=5e-3, log=True),
        "train.weight_decay": SearchParam(low=1e-3, high=0.3, log=True),
        "train.batch_size": SearchParam(choices=[32, 64, 128]),
        "train.lr_schedule": SearchParam(choices=["constant", "cosine"]),
        "train.label_smoothing": SearchParam(choices=[0.0, 0.1, 0.2]),
        "model.dropout": SearchParam(low=0.1, high=0.6),
        "model.n_embd": SearchParam(choices=[32, 64, 128]),
        "model.n_layer": SearchParam(type="int", low=1, high=3),
        "preprocess.max_len": SearchParam(choices=[50, 100, 200]),
    }


class TuneConfig(_Section):
    """``asft tune``: Optuna search over base-model settings on validation (never test) NDCG@10."""

    n_trials: int = Field(30, ge=1, description="Trials to finish (pruned ones count) across all workers.")
    study_name: str = Field("asft-base", description="Optuna study name (resumed when it exists).")
    storage: str | None = Field(None, description="Optuna storage URL (e.g. postgresql://...); None: SQLite file"
                                " study.db in the tune output directory.")
    sampler_seed: int = Field(2026, description="TPE sampler seed.")
    startup_trials: int = Field(8, ge=1, description="Random trials before TPE models the search space.")
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="Stop a trial whose validation metric trails the median of earlier trials at the"
        " same epoch ('median'), by successive halving ('hyperband'), or never ('none').")
    pruner_warmup_epochs: int = Field(10, ge=0, description="Epochs a trial runs before it may be pruned.")
    space: dict[str, SearchParam] = Field(default_factory=_default_space, description="Searched settings:"
                                          " dotted config key -> range or choices.")

    @field_validator("space")
    @classmethod
    def _keys_exist(cls, v: dict[str, SearchParam]) -> dict[str, SearchParam]:
        known = Config().flat()
        bad = [k for k in v if k not in known]
        if bad:
            raise ValueError(f"unknown setting(s) {bad} in tune.space (dotted config keys, e.g. train.lr)")
        return v


class Config(_Section):
    """The whole pipeline configuration (``params.yaml``)."""

    seed: int = Field(2026, description="Global seed: simulator, splits, initialisation, data order.")
    data: DataConfig = Field(default_factory=DataConfig)
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: BaseTrainConfig = Field(default_factory=BaseTrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    preferences: PreferenceConfig = Field(default_factory=PreferenceConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    judge: JudgeEnsembleConfig = Field(default_factory=JudgeEnsembleConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    posttrain: PostTrainConfig = Field(default_factory=PostTrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.reward.fold >= 0 and self.judge.fold == self.reward.fold:
            raise ValueError(f"judge.fold ({self.judge.fold}) must differ from reward.fold: the judge is trained on"
                             " the other half of the preference data")
        if self.sampling.top_k and self.sampling.top_k < self.sampling.n_candidates:
            raise ValueError(f"sampling.top_k ({self.sampling.top_k}) < sampling.n_candidates"
                             f" ({self.sampling.n_candidates}): cannot draw that many distinct items")
        pt = self.posttrain
        if pt.methods and pt.champion_method not in pt.methods:
            raise ValueError(f"posttrain.champion_method '{pt.champion_method}' is not in posttrain.methods {pt.methods}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. for ``mlflow.log_params``."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict) and obj:
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = obj

        walk("", self.to_dict())
        return out

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections (used to key caches and to detect changed params)."""
        d = self.to_dict()
        payload = json.dumps({s: d[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _set_dotted(d: dict[str, Any], key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{origin}: cannot set '{key}': '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def _safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` whose every failure is a ConfigError naming ``what`` (never a bare traceback):
    syntax errors, python/* tags, invalid !!int/!!float/!!timestamp values, integers beyond Python's
    digit limit, nesting too deep for the parser."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{what}: YAML nested too deeply") from None
    except (ValueError, TypeError, OverflowError, MemoryError) as e:
        raise ConfigError(f"{what}: YAML value cannot be read: {type(e).__name__}: {str(e)[:200]}") from None


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are read as YAML scalars/lists (safe loader only)."""
    out = []
    for ov in overrides or []:
        if not isinstance(ov, str):
            raise ConfigError(f"override {ov!r}: expected a key=value string, got {type(ov).__name__}")
        if "=" not in ov:
            raise ConfigError(f"override '{ov}': expected key=value")
        key, raw = ov.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{ov}': empty key")
        if any(not p.strip() for p in key.split(".")):
            raise ConfigError(f"override '{ov}': empty section name in key '{key}'")
        value = _safe_yaml(raw, f"override '{ov}': value") if raw != "" else None
        out.append((key, value))
    return out


def _read_config_file(p: Path) -> dict[str, Any]:
    try:
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        data = p.read_bytes()
    except (OSError, ValueError) as e:  # permissions, name too long, NUL byte in the path
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{p}: cannot read config file: {e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}: not UTF-8 text (invalid byte at offset {e.start}, line {line})") from None
    loaded = _safe_yaml(text, str(p))
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
    bad = [k for k in loaded if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{p}: top-level keys must be strings, got {bad[0]!r} ({type(bad[0]).__name__})")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``params.yaml`` (or defaults when ``path`` is None) and apply ``key=value`` overrides.

    Every problem -- unreadable file, invalid YAML, unknown key, wrong type, out-of-range value, a data
    path outside the allowed roots -- raises :class:`ConfigError` naming the file (or override) and key."""
    origin = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = copy.deepcopy(_read_config_file(Path(path)))
        except RecursionError:
            raise ConfigError(f"{path}: YAML nested too deeply") from None
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value, f"{origin} override")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{origin}: invalid configuration\n" + "\n".join(lines)) from None
    except RecursionError:
        raise ConfigError(f"{origin}: configuration nested too deeply") from None


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


PARAMS_HEADER = """\
# GENERATED from the defaults in asft/config.py by `asft config --defaults > params.yaml`; a test fails when
# the two differ, so change a default there and regenerate. Every field is documented in asft/config.py
# (`asft config` prints the resolved values). Override any key with key=value on the command line, or
# point --config at your own file holding only the keys you change.
"""


def defaults_yaml() -> str:
    """``params.yaml``: every setting at its default (DVC tracks params by key, so all keys are listed)."""
    return PARAMS_HEADER + yaml.safe_dump(Config().to_dict(), sort_keys=False)


def overrides_from_model(model: BaseModel | None) -> list[str]:
    """``key=value`` overrides from a partial config (:data:`ConfigOverrides`, the flow's typed parameter):
    one per field that is set, descending into sections only."""
    out: list[str] = []

    def walk(prefix: str, obj: BaseModel) -> None:
        for name in type(obj).model_fields:
            v = getattr(obj, name)
            if v is None:
                continue
            key = f"{prefix}{name}"
            if isinstance(v, BaseModel):
                walk(key + ".", v)
            else:
                out.append(f"{key}={json.dumps(v, default=str)}")

    if model is not None:
        walk("", model)
    return out


def _partial(model: type[BaseModel], name: str) -> type[BaseModel]:
    """The same sections and fields as ``model``, every field optional with default None (a leaf that is
    not set keeps the value of the config file)."""
    from pydantic import create_model

    fields: dict[str, Any] = {}
    for fname, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, _Section):
            ann = _partial(ann, f"{ann.__name__}Overrides")
        fields[fname] = (ann | None, Field(None, description=f.description))
    return create_model(name, __config__=ConfigDict(extra="forbid"), __doc__=model.__doc__, **fields)


ConfigOverrides = _partial(Config, "ConfigOverrides")
ConfigOverrides.__doc__ = ("Settings to change for this run (every field optional; unset fields keep the values"
                           " of the config file). The typed form of `key=value` overrides.")


class ConfigField(BaseModel):
    """One settable leaf of the configuration (for generated command-line flags)."""

    key: str
    description: str | None = None
    metavar: str = "VALUE"
    choices: list[str] | None = None


def _leaf(key: str, f) -> ConfigField:
    import typing

    ann = f.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)] if typing.get_origin(ann) in (
        typing.Union, __import__("types").UnionType) else [ann]
    choices = None
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        choices = [str(a) for a in typing.get_args(args[0])]
    name = getattr(args[0], "__name__", str(args[0])) if len(args) == 1 else "VALUE"
    return ConfigField(key=key, description=f.description, metavar=name.upper(), choices=choices)


def config_fields(keys) -> list[ConfigField]:
    """The leaves of the configuration under each key in ``keys`` (a section or a dotted field)."""
    out: list[ConfigField] = []

    def walk(prefix: str, model: type[BaseModel]) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, _Section):
                walk(f"{prefix}{name}.", ann)
            else:
                out.append(_leaf(f"{prefix}{name}", f))

    for key in keys:
        model: type[BaseModel] = Config
        parts = key.split(".")
        for i, part in enumerate(parts):
            f = model.model_fields[part]
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, _Section):
                model = ann
                if i == len(parts) - 1:
                    walk(key + ".", model)
            else:
                out.append(_leaf(key, f))
    return out
