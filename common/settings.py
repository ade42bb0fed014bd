"""Run settings: one flat mapping shared by the ServerApp, the ClientApps and the CLI.

Flower's run config holds scalars only, so a run is described by flat keys ("rounds",
"epsilon", "local-steps", ...). A simulation TOML file groups them in tables for reading
([federation], [dp], ...); table names are dropped when flattening, so every key is unique.
Everything is validated here, before any process starts.
"""

from __future__ import annotations

import math
import random
import tomllib
import difflib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from common.data.control import check_label_field
from common.errors import ConfigError
from common.privacy.accounting import DEFAULT_ACCOUNTANT

MODES = ("dp-lora", "distildp", "dp-opd", "pdss")
TEACHER_RUN_MODES = ("dp-lora", "distildp")  # runs whose DP teacher a dp-opd student may learn from
STUDENT_TRAINING = ("dp-sgd", "local-only")
STUDENT_UPDATES = ("lora", "full")  # pdss: what a site trains and FedAvg averages (common/models/student_update.py)
OUTPUT_SETS = ("public-tokens", "vocabulary")
PRIVATISERS = ("exponential", "encoder-decoder")
MAX_PROMPT_EPSILON = 500.0
WIRE_DTYPES = ("float32", "float16")
PROMPT_SOURCES = ("control-codes", "bos")
LABEL_SOURCES = ("dp-histogram", "public")


@dataclass
class DPLoRAConfig:
    """Everything a client needs to run its DP-SGD LoRA step (same on every round)."""

    epsilon: float = 8.0              # target ε for the whole planned run (all rounds)
    delta: float | None = None        # default: min(1e-5, 1/(10·n_records))
    rounds: int = 1                   # planned rounds; σ is calibrated for rounds × local_steps
    local_steps: int = 30             # logical DP-SGD steps per round
    batch_size: int = 16              # expected logical batch (Poisson sampling)
    max_physical_batch_size: int = 16  # memory bound; opacus accumulates up to batch_size
    max_grad_norm: float = 1.0
    learning_rate: float = 5e-3
    max_length: int = 128
    accountant: str = DEFAULT_ACCOUNTANT  # tight (PLD); "prv" or "rdp" also available
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None
    seed: int = 0                     # LoRA initialisation only; DP noise is never seeded
    private: bool = True              # False: no clipping/noise, ε = ∞ (audit baselines only)
    text_field: str = "text"
    label_field: str = ""            # control codes: train on label + blank line + text (DistilDP)
    device: str | None = None

    @classmethod
    def from_mapping(cls, values: dict) -> "DPLoRAConfig":
        """Build from a flat mapping (a Flower config record or a TOML table); '-' == '_'."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(unknown_key_message(key, known, "dp-lora setting"))
            if name == "lora_targets" and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()] or None
            kwargs[name] = value
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"epsilon must be a positive number, got {self.epsilon}")
        for name in ("rounds", "local_steps", "batch_size", "max_physical_batch_size", "max_length", "lora_r"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SynthesisSettings:
    """DistilDP step 2: DP synthetic text from the DP teacher (post-processing of its release)."""

    synthetic_records: int = 2000      # records to keep after filtering
    prompt_source: str = "control-codes"  # control-codes (needs label-field) | bos (unconditional)
    label_source: str = "dp-histogram"  # how many prompts per label: dp-histogram (each site, once) | public
    histogram_epsilon: float = 0.5     # ε of each site's DP label histogram (Gaussian, composed in its ledger)
    label_set: str = ""                # the public label set, comma-separated; "": the public split's labels
    gen_max_new_tokens: int = 96
    gen_temperature: float = 1.0
    gen_top_k: int = 50
    gen_top_p: float = 0.9
    gen_no_repeat_ngram: int = 2
    gen_batch_size: int = 32
    shard_size: int = 256

    def validate(self) -> None:
        if self.synthetic_records < 1:
            raise ConfigError(f"synthetic-records must be ≥ 1, got {self.synthetic_records}")
        if self.prompt_source not in PROMPT_SOURCES:
            raise ConfigError(f"prompt-source must be one of {', '.join(PROMPT_SOURCES)}, got {self.prompt_source!r}")
        if self.label_source not in LABEL_SOURCES:
            raise ConfigError(f"label-source must be one of {', '.join(LABEL_SOURCES)}, got {self.label_source!r} "
                              "(raw private label counts are never used: they would fall outside the DP guarantee)")
        if not (self.histogram_epsilon > 0 and math.isfinite(self.histogram_epsilon)):
            raise ConfigError(f"histogram-epsilon must be a positive number, got {self.histogram_epsilon}")
        for name in ("gen_max_new_tokens", "gen_batch_size", "shard_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if not self.gen_temperature > 0:
            raise ConfigError(f"gen-temperature must be > 0, got {self.gen_temperature}")
        if not 0 < self.gen_top_p <= 1:
            raise ConfigError(f"gen-top-p must be in (0, 1], got {self.gen_top_p}")
        if self.gen_top_k < 0 or self.gen_no_repeat_ngram < 0:
            raise ConfigError("gen-top-k and gen-no-repeat-ngram must be ≥ 0 (0 turns them off)")

    def labels(self) -> list[str]:
        return [x.strip() for x in self.label_set.split(",") if x.strip()]


@dataclass
class DistillSettings:
    """DistilDP step 3: the student learns from the DP teacher on the synthetic text (server only)."""

    student: str = "from-teacher"      # from-teacher (every other block) | a tiny spec | an HF id or local path
    kd_lambda: float = 0.4             # weight of the soft-label term (1 − λ on the hard labels)
    kd_temperature: float = 1.0
    kd_beta: float = 0.0               # weight of the hidden-state alignment (a learned projection W)
    kd_top_k: int = 0                  # soft labels over the teacher's top-k tokens only (0: full vocabulary)
    kd_kl_start: int = 0               # first position the soft-label term counts (the reference uses 5)
    distill_steps: int = 300
    distill_batch_size: int = 32
    distill_learning_rate: float = 5e-4
    distill_max_length: int = 128
    distill_checkpoint_every: int = 50

    def validate(self) -> None:
        if not 0 <= self.kd_lambda <= 1:
            raise ConfigError(f"kd-lambda must be in [0, 1], got {self.kd_lambda}")
        if not (self.kd_temperature > 0 and math.isfinite(self.kd_temperature)):
            raise ConfigError(f"kd-temperature must be > 0, got {self.kd_temperature}")
        if not (self.kd_beta >= 0 and math.isfinite(self.kd_beta)):
            raise ConfigError(f"kd-beta must be ≥ 0, got {self.kd_beta}")
        if self.kd_top_k < 0 or self.kd_kl_start < 0:
            raise ConfigError("kd-top-k and kd-kl-start must be ≥ 0")
        for name in ("distill_steps", "distill_batch_size", "distill_max_length", "distill_checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if not self.distill_learning_rate > 0:
            raise ConfigError(f"distill-learning-rate must be > 0, got {self.distill_learning_rate}")
        if not self.student.strip():
            raise ConfigError("student is empty; use from-teacher, a tiny spec (tiny-gpt2, ...) or a model path")


@dataclass
class OPDSettings:
    """DP-OPD: the sites train the student with DP-SGD on its own continuations of their private
    prefixes, against a frozen teacher's token distributions (generalised JSD, GKD).

    Per record: loss = (1 − w)·[λ·D_β(student rollout) + (1 − λ)·D_β(the record's own continuation)]
    + w·CE(the record's own continuation), D_β the generalised JSD against the teacher over
    continuation tokens only (λ = ``opd-lambda``, β = ``opd-beta``, w = ``opd-ce-weight``).
    DistilDP's DPKD baseline (a DP-SGD student on the private records with (1−0.4)·CE + 0.4·KL
    against a DP teacher) is ``opd-lambda = 0``, ``opd-beta = 0``, ``opd-ce-weight = 0.6``,
    ``opd-prefix = 1`` (every target token counts) and ``opd-teacher`` = the DP teacher's run.
    """

    opd_teacher: str = "public"        # public (model-dir, no cost) | a finished dp-lora/distildp run directory
    opd_prefix: float = 0.5            # < 1: share of each record's tokens kept as prefix; ≥ 1: that many tokens
    opd_max_new_tokens: int = 32       # the student's continuation, at most
    opd_temperature: float = 1.0       # the student's sampling temperature (the loss is at T = 1)
    opd_beta: float = 0.0              # GJSD β: 0 forward KL(teacher‖student) (DP-OPD's best), 1 reverse KL
    opd_lambda: float = 1.0            # on-policy share: 1 student rollouts only, 0 the record's own tokens (DPKD)
    opd_ce_weight: float = 0.0         # w: weight of the CE on the record's own continuation

    def validate(self) -> None:
        for name in ("opd_beta", "opd_lambda", "opd_ce_weight"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if not (self.opd_prefix > 0 and math.isfinite(self.opd_prefix)) or \
                (self.opd_prefix >= 1 and self.opd_prefix != int(self.opd_prefix)):
            raise ConfigError(f"opd-prefix must be a share in (0, 1) or a whole token count ≥ 1, got {self.opd_prefix}")
        if int(self.opd_max_new_tokens) < 1:
            raise ConfigError(f"opd-max-new-tokens must be ≥ 1, got {self.opd_max_new_tokens}")
        if not (self.opd_temperature > 0 and math.isfinite(self.opd_temperature)):
            raise ConfigError(f"opd-temperature must be > 0, got {self.opd_temperature}")
        if not self.opd_teacher.strip():
            raise ConfigError("opd-teacher is empty; use public or the directory of a finished dp-lora/distildp run")

    @property
    def public_teacher(self) -> bool:
        return self.opd_teacher.strip() == "public"

    @property
    def on_policy(self) -> bool:
        """Whether the student samples continuations (λ > 0); λ = 0 needs no generation."""
        return self.opd_lambda > 0 and self.opd_ce_weight < 1


def teacher_run_settings(run_dir: str | Path, student_private: bool = True) -> "RunSettings":
    """The settings of a finished DP teacher run, refused (ConfigError, saying why) when a
    dp-opd student could not learn from it without losing its guarantee."""
    state_path = Path(run_dir) / "state.json"
    if not state_path.is_file():
        raise ConfigError(f"opd-teacher {run_dir}: no state.json there; use public or a finished dp-lora/distildp run")
    import json

    state = json.loads(state_path.read_text(encoding="utf-8"))
    flat = state.get("settings", {})
    if flat.get("mode") not in TEACHER_RUN_MODES:
        raise ConfigError(f"opd-teacher {run_dir} is a {flat.get('mode')!r} run; the teacher must come from a "
                          f"{' or '.join(TEACHER_RUN_MODES)} run")
    # A student without DP (private = false, an ε = ∞ baseline) claims nothing, so any teacher will do.
    if not flat.get("private", True) and student_private:
        raise ConfigError(
            f"opd-teacher {run_dir} was trained on the sites' private data without DP (private = false): its outputs "
            "on record i depend on every other private record outside any DP mechanism, so DP-SGD's per-record "
            "sensitivity no longer bounds what the student learns from it; use a DP teacher run or public")
    settings = RunSettings.from_flat({**flat, "run-dir": str(run_dir)})
    if state.get("completed_round", 0) < settings.rounds or not state.get("adapter"):
        raise ConfigError(f"opd-teacher {run_dir} finished {state.get('completed_round', 0)} of {settings.rounds} "
                          "rounds; finish it (--resume) before a student learns from it")
    return settings


@dataclass
class PDSSSettings:
    """pdss: perturbed prompts → the server teacher's rationales → step-by-step students, federated."""

    question_field: str = "question"
    answer_field: str = "answer"
    rationale_field: str = "rationale"     # public split only: few-shot examples and the teacher's warm-up
    token_epsilon: float = 4.0             # ε per perturbed token (exponential mechanism); inf: sent unperturbed
    prompt_epsilon: float = 64.0           # the most one record's prompt may cost (part of the site's budget)
    perturb_utility: str = "euclidean"     # euclidean (clipped distance) | cosine
    perturb_distance_clip: float = 0.0     # euclidean: Δu; 0: median pairwise distance of the output set
    perturb_output_set: str = "public-tokens"  # public-tokens (of the public split's questions) | vocabulary
    perturb_candidates: str = "all"        # all (ε-DP) | knn (the public code's; weaker guarantee, stated)
    perturb_knn: int = 0
    perturb_allow_list: str = "default"    # comma-separated template words that pass through; default: the task's
    teacher_dir: str = ""                  # the server's teacher (save_pretrained dir); "": model-dir
    teacher_few_shot: int = 1              # public examples before each prompt
    teacher_max_new_tokens: int = 24
    teacher_batch_size: int = 32
    student_training: str = "dp-sgd"       # dp-sgd (the update leaves: FedAvg) | local-only (nothing leaves)
    rationale_weight: float = 0.5          # α in L = (1 − α)·L_answer + α·L_rationale
    student_update: str = "lora"           # lora (the LoRA adapter is trained and federated) | full (every weight)
    student_eval_max_new_tokens: int = 6
    # exponential: the mechanism alone; encoder-decoder: a local model trained on public data rewrites each
    # question before the mechanism and turns the teacher's rationale back into one for the raw question
    privatiser: str = "exponential"
    privatiser_steps: int = 200            # full fine-tune steps of the privatiser (public data, no DP)
    privatiser_batch_size: int = 16
    privatiser_learning_rate: float = 1e-3
    privatiser_max_new_tokens: int = 48    # the longest rewritten question / decoded rationale
    privatiser_prompt_tokens: int = 32     # every rewrite is sent as exactly this many tokens, all perturbed
    # Simulation only: the student's public base model (model-dir), warmed on the public split.
    student_spec: str = "tiny-gpt2"
    student_warmup_steps: int = 100

    def validate(self) -> None:
        from common.privacy.exponential import CANDIDATES, UTILITIES, check_epsilon

        check_epsilon(self.token_epsilon)
        if not (0 < self.prompt_epsilon <= MAX_PROMPT_EPSILON):
            raise ConfigError(f"prompt-epsilon must be in (0, {MAX_PROMPT_EPSILON:g}], got {self.prompt_epsilon} "
                              "(a larger per-record ε is no guarantee, and overflows the PLD accountant)")
        for name, value, allowed in (("perturb-utility", self.perturb_utility, UTILITIES),
                                     ("perturb-candidates", self.perturb_candidates, CANDIDATES),
                                     ("perturb-output-set", self.perturb_output_set, OUTPUT_SETS),
                                     ("student-training", self.student_training, STUDENT_TRAINING),
                                     ("student-update", self.student_update, STUDENT_UPDATES)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.privatiser not in PRIVATISERS:
            raise ConfigError(f"privatiser must be one of {', '.join(PRIVATISERS)}, got {self.privatiser!r}")
        for name in ("privatiser_steps", "privatiser_batch_size", "privatiser_max_new_tokens",
                     "privatiser_prompt_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if not 0 < self.privatiser_learning_rate < 1:
            raise ConfigError(f"privatiser-learning-rate must be in (0, 1), got {self.privatiser_learning_rate}")
        if not 0 <= self.rationale_weight <= 1:
            raise ConfigError(f"rationale-weight must be in [0, 1], got {self.rationale_weight}")
        if self.teacher_few_shot < 0:
            raise ConfigError(f"teacher-few-shot must be ≥ 0, got {self.teacher_few_shot}")
        for name in ("teacher_max_new_tokens", "teacher_batch_size", "student_eval_max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if not self.question_field or not self.answer_field:
            raise ConfigError("question-field and answer-field must name the task data's fields")

    def allow_words(self) -> list[str]:
        if self.perturb_allow_list.strip() == "default":
            from common.data.arithmetic import TEMPLATE_WORDS

            return list(TEMPLATE_WORDS)
        return [w.strip() for w in self.perturb_allow_list.split(",") if w.strip()]

    @property
    def perturbs(self) -> bool:
        return math.isfinite(self.token_epsilon)

    @property
    def answer_only(self) -> bool:
        """rationale-weight 0: the student never reads a rationale, so no prompt leaves a site
        (sending one would spend ε for nothing); the DP-SGD baseline of distilling step by step."""
        return self.rationale_weight == 0

    @property
    def encoder_decoder(self) -> bool:
        """The encoder-decoder privatiser is in use (answer-only sends no prompt: nothing to privatise)."""
        return self.privatiser == "encoder-decoder" and not self.answer_only


def unknown_key_message(key: str, known, what: str = "setting") -> str:
    close = difflib.get_close_matches(key.replace("_", "-"), [k.replace("_", "-") for k in known], n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "see simulations/configs/ and README for the known settings"
    return f"unknown {what} {key!r}; {hint}"



@dataclass
class RunSettings:
    """The federation-level settings; client-mode settings live in ``dp`` (DPLoRAConfig)."""

    name: str = "dp-lora"
    mode: str = "dp-lora"
    clients: int = 5                # simulated clients (simulation) / expected sites
    rounds: int = 3
    min_clients: int = 2            # valid replies needed for a round to complete
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0  # share of sites that report held-out perplexity; 0: as fraction-train
    round_timeout: float = 600.0    # seconds to wait for replies before counting dropouts
    max_update_norm: float = 50.0   # L2 norm bound on (client adapter − global adapter)
    wire_dtype: str = "float32"     # adapter tensors on the wire
    data_dir: str = ""              # simulation: DIR/client_i/{train,heldout}.jsonl
    model_dir: str = ""             # the shared base model (save_pretrained directory)
    run_dir: str = ""               # where checkpoints, round states and (simulation) ledgers go
    resume: bool = False
    seed: int = 0
    # User-level central DP on the server (Flower's clipping/noise wrapper, opacus accounting).
    central_dp: bool = False
    central_noise_multiplier: float = 1.0
    central_clip: float = 1.0          # C: bound on each site's whole adapter update
    central_epsilon: float = 10.0      # the server's user-level budget for the run
    central_delta: float = 0.0         # 0: min(1e-5, 1/(10·clients))
    central_clipping: str = "fixed"    # or "adaptive": C tracks a quantile of the update norms
    central_clip_at: str = "server"    # or "site": each site clips its own update (always, with SecAgg+)
    central_target_quantile: float = 0.5  # adaptive: share of site updates that should be clipped
    central_clip_lr: float = 0.2       # adaptive: how fast C moves
    central_count_stddev: float = 0.0  # adaptive: noise std on the clipped count (0: min-clients/20)
    # Secure aggregation (Flower's SecAgg+; legacy workflow stack): the server sees only the sum.
    secure_aggregation: bool = False
    secagg_shares: float = 1.0         # share of a round's sites each site splits its keys among
    secagg_threshold: float = 0.6      # share of those shares needed to unmask (tolerates the rest dropping)
    secagg_clip_range: float = 8.0     # adapter values are clipped to ±this before quantisation
    # Fault injection for tests and drills: client `fail_client` raises in round `fail_round`.
    fail_client: str = ""
    fail_round: int = 0
    fail_fraction: float = 0.0       # each site fails each round with this probability (seeded)
    fail_phase: str = ""             # server phase (synthesis, distillation) that stops after...
    fail_phase_after: int = 0        # ...this many shards / steps (resume drills)
    # Simulation only (not part of Flower's run config semantics elsewhere).
    generate_data: bool = False
    site_stamp: bool = True          # generated corpus: per-site export stamp on private records (false: like real text)
    task_train_per_client: int = 60      # generated pdss task: private training records per site
    task_heldout_per_client: int = 20    # generated pdss task: held-out records per site (the accuracy's sample)
    warmup_spec: str = "tiny-gpt2"
    warmup_steps: int = 120
    num_cpus: int = 2
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    # Pipeline phases after the teacher rounds (mode distildp).
    public_path: str = ""            # the public split (server side); "": DATA_DIR/public.jsonl
    audit: bool = True               # a pipeline run audits teacher and student at the end (simulation)
    audit_max_records: int = 300
    audit_candidates: int = 300
    # One section per mode; flat keys are unique across all of them (Flower's run config is flat).
    dp: DPLoRAConfig = None  # type: ignore[assignment]             # the teacher rounds (dp-lora)
    synthesis: SynthesisSettings = None  # type: ignore[assignment]  # distildp: DP synthetic text
    distill: DistillSettings = None  # type: ignore[assignment]      # distildp: student KD
    opd: OPDSettings = None  # type: ignore[assignment]              # dp-opd: on-policy student rounds
    pdss: PDSSSettings = None  # type: ignore[assignment]            # pdss: prompts, rationales, students

    def __post_init__(self):
        self.dp = self.dp or DPLoRAConfig()
        self.synthesis = self.synthesis or SynthesisSettings()
        self.distill = self.distill or DistillSettings()
        self.opd = self.opd or OPDSettings()
        self.pdss = self.pdss or PDSSSettings()

    # ---------------------------------------------------------------------------- building
    @classmethod
    def from_flat(cls, values: dict) -> "RunSettings":
        own = {f.name for f in fields(cls)} - set(SECTIONS)
        section_names = {section: {f.name for f in fields(kind)} for section, kind in SECTIONS.items()}
        run_kwargs: dict = {}
        section_kwargs: dict = {section: {} for section in SECTIONS}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name in own:
                run_kwargs[name] = value
                continue
            section = next((s for s, names in section_names.items() if name in names), None)
            if section is None:
                raise ConfigError(unknown_key_message(key, own.union(*section_names.values())))
            section_kwargs[section][name] = value
        settings = cls(**run_kwargs)
        section_kwargs["dp"]["rounds"] = settings.rounds  # σ is calibrated for every planned round
        settings.dp = DPLoRAConfig.from_mapping(section_kwargs["dp"])
        try:
            settings.synthesis = SynthesisSettings(**section_kwargs["synthesis"])
            settings.distill = DistillSettings(**section_kwargs["distill"])
            settings.opd = OPDSettings(**section_kwargs["opd"])
            settings.pdss = PDSSSettings(**section_kwargs["pdss"])
        except TypeError as err:
            raise ConfigError(f"bad setting: {err}") from None
        settings.validate()
        return settings

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict | None = None) -> "RunSettings":
        flat = flatten_tables(read_toml(path), str(path))
        flat.update(overrides or {})
        return cls.from_flat(flat)

    def to_run_config(self) -> dict:
        """Flat scalar mapping for Flower's run config (None values are left out)."""
        flat = {k.replace("_", "-"): v for k, v in asdict(self).items() if k not in SECTIONS and v is not None}
        sections = {**self.dp.to_dict(), **asdict(self.synthesis), **asdict(self.distill), **asdict(self.opd),
                    **asdict(self.pdss)}
        for key, value in sections.items():
            # None has no run-config form; "rounds" and "seed" are the run's own (dp.rounds copies it)
            if value is None or key.replace("_", "-") in flat:
                continue
            if isinstance(value, list):
                value = ",".join(value)
            flat[key.replace("_", "-")] = value
        return flat

    # ---------------------------------------------------------------------------- checks
    def validate(self) -> None:
        if self.mode not in MODES:
            close = difflib.get_close_matches(self.mode, MODES, n=1)
            raise ConfigError(f"unknown mode {self.mode!r}; available modes: {', '.join(MODES)}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        self.synthesis.validate()
        self.distill.validate()
        self.opd.validate()
        if self.mode == "dp-opd" and not self.opd.public_teacher:
            # absolute, so every process (Ray actors, a resumed server) reads the same run
            self.opd.opd_teacher = str(Path(self.opd.opd_teacher).expanduser().resolve())
            self.check_teacher_run(self.teacher_run())  # refuses a missing, unfinished or non-DP one, before any work
        self.pdss.validate()
        if self.mode == "distildp" and self.synthesis.prompt_source == "control-codes" and not self.dp.label_field:
            raise ConfigError("prompt-source = control-codes needs label-field (the data field that holds each "
                              "record's label, e.g. label-field = \"label\"); or set prompt-source = bos")
        if self.audit_max_records < 10 or self.audit_candidates < 10:
            raise ConfigError("audit-max-records and audit-candidates must be ≥ 10")
        for name in ("clients", "rounds", "min_clients", "task_train_per_client", "task_heldout_per_client"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.min_clients > self.clients:
            raise ConfigError(f"min-clients ({self.min_clients}) is larger than clients ({self.clients}); "
                              "no round could ever complete. Lower min-clients or add clients")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError(f"fraction-evaluate must be in (0, 1] (or 0: same as fraction-train), "
                              f"got {self.fraction_evaluate}")
        # Evaluating every site each round costs as much as training them all: with 100 sites and
        # 10 sampled it would make a round ~10× slower, so by default it follows the sampling.
        self.fraction_evaluate = self.fraction_evaluate or self.fraction_train
        if not (self.max_update_norm > 0 and math.isfinite(self.max_update_norm)):
            raise ConfigError(f"max-update-norm must be a positive number, got {self.max_update_norm}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"wire-dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.round_timeout <= 0:
            raise ConfigError(f"round-timeout must be > 0 seconds, got {self.round_timeout}")
        if self.secure_aggregation:
            self.check_secure_aggregation()
        if self.central_dp and self.central_clip_at == "site" and self.wire_dtype != "float32":
            raise ConfigError("central-clip-at = site needs wire-dtype = float32 (the server checks each clipped "
                              "update's norm against C exactly)")
        if self.central_dp:
            self.central_plan()  # refuses a plan over the server's user-level budget, before round 1

    def check_secure_aggregation(self) -> None:
        from common.privacy.central import sites_per_round

        if sites_per_round(self.clients, self.fraction_train, self.min_clients) < 3 or self.min_clients < 2:
            raise ConfigError("secure-aggregation needs at least 3 sites per round and min-clients ≥ 2 (a sum "
                              "of fewer sites would reveal each one); raise clients, fraction-train or min-clients")
        if not 0 < self.secagg_shares <= 1 or not 0 < self.secagg_threshold <= 1:
            raise ConfigError(f"secagg-shares and secagg-threshold are shares in (0, 1], got {self.secagg_shares} "
                              f"and {self.secagg_threshold}")
        if not self.secagg_clip_range > 0:
            raise ConfigError(f"secagg-clip-range must be > 0, got {self.secagg_clip_range}")
        if self.central_dp and self.central_clipping != "fixed":
            raise ConfigError("secure-aggregation supports central-clipping = fixed only (Flower's client-side adaptive "
                              "clipping sends each site's clipped bit in the clear beside its masked update)")
        if self.wire_dtype != "float32":
            raise ConfigError("wire-dtype must be float32 with secure-aggregation (SecAgg+ quantises the adapter "
                              "itself); remove wire-dtype or set it to float32")

    def injected_failure(self, client_id: str, server_round: int) -> bool:
        """Fault injection (tests, drills): does this site fail this round? Deterministic per seed."""
        if self.fail_client == client_id and self.fail_round == server_round:
            return True
        draw = random.Random(f"{self.seed}/{client_id}/{server_round}").random()
        return self.fail_fraction > 0 and draw < self.fail_fraction

    def central_plan(self):
        from common.privacy.central import plan_central_dp, sites_per_round

        per_round = sites_per_round(self.clients, self.fraction_train, self.min_clients)
        return plan_central_dp(self.clients, per_round, self.rounds, self.min_clients, self.central_noise_multiplier,
                               self.central_clip, self.central_epsilon, self.central_delta or None,
                               clipping=self.central_clipping,
                               clip_at="site" if self.secure_aggregation else self.central_clip_at,
                               target_quantile=self.central_target_quantile,
                               clip_lr=self.central_clip_lr, count_stddev=self.central_count_stddev or None)

    @property
    def uses_label_histogram(self) -> bool:
        return self.mode == "distildp" and self.synthesis.prompt_source == "control-codes" \
            and self.synthesis.label_source == "dp-histogram"

    def site_budget(self) -> float:
        """A site's default lifetime ε budget: what this run plans to spend there. The parts'
        sum bounds their composition from above, so the planned run always fits. A dp-opd
        student of a DP teacher adds its ε to the teacher run's budget (the same ledgers)."""
        if self.mode == "pdss":
            student = self.dp.epsilon if self.pdss.student_training == "dp-sgd" and self.dp.private else 0.0
            prompts = self.pdss.prompt_epsilon if self.pdss.perturbs and not self.pdss.answer_only else 0.0
            return student + prompts or self.dp.epsilon
        own = self.dp.epsilon + (self.synthesis.histogram_epsilon if self.uses_label_histogram else 0.0)
        teacher = self.teacher_run()
        return own + (teacher.site_budget() if teacher else 0.0)

    # ---------------------------------------------------------------------------- dp-opd
    def teacher_run(self) -> "RunSettings | None":
        """dp-opd with a DP teacher: that run's settings (checked); None otherwise."""
        if self.mode != "dp-opd" or self.opd.public_teacher:
            return None
        return teacher_run_settings(self.opd.opd_teacher, self.dp.private)

    def check_teacher_run(self, teacher: "RunSettings") -> None:
        """The student charges the teacher's ledgers, and its adapter fits one base only."""
        same = lambda a, b: bool(a) and bool(b) and Path(a).resolve() == Path(b).resolve()  # noqa: E731
        if self.data_dir and not same(self.data_dir, teacher.data_dir):
            raise ConfigError(f"opd-teacher {self.opd.opd_teacher} was trained on data-dir {teacher.data_dir}, not "
                              f"{self.data_dir}; the student composes with the teacher in the same sites' ledgers")
        if self.model_dir and not same(self.model_dir, teacher.model_dir):
            raise ConfigError(f"opd-teacher {self.opd.opd_teacher} adapts model-dir {teacher.model_dir}, not "
                              f"{self.model_dir}; set model-dir to the teacher run's base")
        if teacher.dp.accountant != self.dp.accountant:
            raise ConfigError(f"opd-teacher {self.opd.opd_teacher}'s ledgers use accountant {teacher.dp.accountant!r}; "
                              f"set accountant = {teacher.dp.accountant!r} (a ledger's accountant never changes)")

    def opd_teacher_model(self) -> tuple[str, Path | None]:
        """dp-opd's frozen teacher as (base, DP adapter or None): the public base in model-dir,
        or a DP teacher run's final adapter (merged onto its base: post-processing of its release)."""
        teacher = self.teacher_run()
        if teacher is None:
            return self.model_dir, None
        import json

        state = json.loads((Path(teacher.run_dir) / "state.json").read_text(encoding="utf-8"))
        return teacher.model_dir, Path(teacher.run_dir) / state["adapter"]

    def ledger_dir(self) -> Path:
        """Where the simulated sites' ledgers are: a dp-opd student of a DP teacher charges the
        teacher run's ledgers, so each site's composed ε covers both."""
        teacher = self.teacher_run()
        return teacher.ledger_dir() if teacher else Path(self.run_dir) / "ledgers"

    def rounds_model_dir(self) -> str:
        """The base model whose LoRA adapters the federated rounds train: the student (dp-opd,
        built once in RUN_DIR/student-base) or the shared teacher base."""
        return str(Path(self.run_dir) / STUDENT_BASE_DIR) if self.mode == "dp-opd" else self.model_dir

    def public_file(self) -> Path:
        return Path(self.public_path) if self.public_path else Path(self.data_dir) / "public.jsonl"

    def check_paths(self, need_data: bool = True) -> None:
        """Paths a simulation needs before anything starts (skipped for what it will generate)."""
        if not self.model_dir:
            raise ConfigError("model-dir is not set; point it at a save_pretrained directory "
                              "(e.g. from `privdistill teacher warmup`)")
        if not need_data:
            return
        if not self.data_dir:
            raise ConfigError("data-dir is not set; point it at a directory with client_i/train.jsonl files "
                              "(e.g. from `privdistill data generate`)")
        for i in range(self.clients):
            for split in ("train", "heldout"):
                path = Path(self.data_dir) / f"client_{i}" / f"{split}.jsonl"
                if not path.is_file():
                    raise ConfigError(f"missing data file {path} for client {i} of {self.clients}; "
                                      "generate the corpus with `privdistill data generate` or fix data-dir")
        if self.dp.label_field:
            from common.data.loading import load_records

            for i in range(self.clients):
                path = Path(self.data_dir) / f"client_{i}" / "train.jsonl"
                check_label_field(load_records(path, field=self.dp.text_field, label_field=self.dp.label_field),
                                  path, self.dp.label_field)


SECTIONS = {"dp": DPLoRAConfig, "synthesis": SynthesisSettings, "distill": DistillSettings, "opd": OPDSettings,
            "pdss": PDSSSettings}
STUDENT_BASE_DIR = "student-base"  # dp-opd: the student before any private round (save_pretrained)


def ledger_dir_of(run_dir: str | Path, flat: dict) -> Path:
    """The ledger directory of a run from its recorded settings (``state["settings"]``), as
    ``RunSettings.ledger_dir`` gives it: RUN_DIR/ledgers, or a dp-opd student's DP teacher run's."""
    teacher = str(flat.get("opd-teacher", "public")).strip()
    if flat.get("mode") == "dp-opd" and teacher != "public":
        return Path(teacher) / "ledgers"
    return Path(run_dir) / "ledgers"


def read_toml(path: str | Path, examples: str = "simulations/configs/") -> dict:
    """A config file's document, or a one-line ConfigError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; see {examples} for examples")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err}); fix the syntax") from err


def flatten_tables(document: dict, source: str = "config") -> dict:
    flat: dict = {}
    for key, value in document.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for inner, inner_value in items:
            if isinstance(inner_value, dict):
                raise ConfigError(f"{source}: table [{key}.{inner}] is nested too deep; use one level of tables")
            if inner in flat:
                raise ConfigError(f"{source}: key {inner!r} appears twice; keys must be unique across tables")
            flat[inner] = inner_value
    return flat


def parse_overrides(items: list[str]) -> dict:
    """``["rounds=5", "epsilon=2.0", 'name="x"']`` → typed values (TOML syntax, bare strings allowed)."""
    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. --set rounds=5)")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word: take it as a string
        overrides[key.strip()] = value
    return overrides
