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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from client.dp_lora import DPLoRAConfig
from common.errors import ConfigError

MODES = ("dp-lora",)
WIRE_DTYPES = ("float32", "float16")


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
    # Simulation only (not part of Flower's run config semantics elsewhere).
    generate_data: bool = False
    warmup_spec: str = "tiny-gpt2"
    warmup_steps: int = 120
    num_cpus: int = 2
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    dp: DPLoRAConfig = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.dp is None:
            self.dp = DPLoRAConfig()

    # ---------------------------------------------------------------------------- building
    @classmethod
    def from_flat(cls, values: dict) -> "RunSettings":
        own = {f.name for f in fields(cls)} - {"dp"}
        dp_names = {f.name for f in fields(DPLoRAConfig)}
        run_kwargs, dp_kwargs = {}, {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name in own:
                run_kwargs[name] = value
            elif name in dp_names:
                dp_kwargs[name] = value
            else:
                raise ConfigError(f"unknown setting {key!r}; known: {', '.join(sorted(own | dp_names))}")
        settings = cls(**run_kwargs)
        dp_kwargs["rounds"] = settings.rounds  # σ is calibrated for every planned round
        settings.dp = DPLoRAConfig.from_mapping(dp_kwargs)
        settings.validate()
        return settings

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict | None = None) -> "RunSettings":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; see simulations/configs/ for examples")
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid TOML ({err}); fix the syntax") from err
        flat = flatten_tables(document, str(path))
        flat.update(overrides or {})
        return cls.from_flat(flat)

    def to_run_config(self) -> dict:
        """Flat scalar mapping for Flower's run config (None values are left out)."""
        flat = {k.replace("_", "-"): v for k, v in asdict(self).items() if k != "dp" and v is not None}
        for key, value in self.dp.to_dict().items():
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
            raise ConfigError(f"unknown mode {self.mode!r}; available modes: {', '.join(MODES)}")
        for name in ("clients", "rounds", "min_clients"):
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
