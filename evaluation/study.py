"""The gap study (``steerloop study`` / ``steerloop demo``): record, train, evaluate, report.

A study file (TOML) names the datasets to record, the policies to train on them (plain
behaviour cloning or DAgger from another policy of the study) and the closed-loop
suites to run. The study runs as a chain of stages::

    record dataset -> train policy (or DAgger) -> offline metrics -> closed loop per suite -> report

Every stage is cached by content: its key hashes its own settings and the keys of the
stages it depends on, its output lives in a directory named after the key, and a marker
in ``OUT/stages/`` says it finished. Re-running a finished study does nothing; changing
one policy re-runs only that policy's stages and the report; an interrupted study
resumes (recording, training and evaluation also resume inside a stage).

Study file (every key optional unless marked)::

    [study]
    name = "default"
    resolution = [66, 200]        # camera (H, W) for recording and evaluation
    suites = ["test", "recovery", "interventions"]   # built-in names or suite JSON paths
    offline_data = "val"          # dataset (recorded on the val split) for offline metrics
    threads = 2                   # torch threads when training
    short_loop = { rollouts = 16, horizon = 3.0, warmup = 1.0, seed = 0 }   # short closed-loop rollouts
                                  # from logged states of offline_data (docs/metrics.md); rollouts = 0: none

    [cells.new-conditions]        # optional: Codevilla's cells (tracks x conditions), each an offline
    offline_data = "val-new"      # dataset and the closed-loop suite (one of study.suites) of the same
    suite = "generalization"      # cell; the report gives every correlation per cell

    [datasets.clean]              # any RecordConfig field except out / workers
    episodes = 20
    [datasets.dart]
    episodes = 20
    noise = 0.1

    [policies.pilotnet-clean]     # any TrainConfig field except out / init; data names datasets
    model = "pilotnet"
    data = ["clean"]
    augment = []
    [policies.pilotnet-long]      # trained once; its checkpoints after epochs 1, 2 and 4 are policies too
    model = "pilotnet"
    data = ["clean"]
    epochs = 4
    checkpoints = [1, 2, 4]       # -> pilotnet-long-e01, pilotnet-long-e02, pilotnet-long-e04
    [policies.pilotnet-dagger]    # DAgger from another policy of the study: any DaggerConfig field
    dagger = { init = "pilotnet-clean", iterations = 2, episodes_per_iter = 6 }   # except out / data / workers
                                  # (conditions / condition_file: in the key only when given)

    [policies.mine]               # a user's own policy, evaluated beside the trained ones
    policy = "mypkg.models:load"  # any policy spec: package.module:attr, path/to/file.py:attr,
    kwargs = { weights = "mine.pt" }   # a checkpoint directory or a .zip; kwargs for a class/factory

Paths in the file are relative to it (also a ``file.py:attr`` spec's file, and the kwargs
strings that name a file next to the study file). ``family`` (a label for grouping in the
report) may be set on any policy; it defaults to the architecture (``user`` for a user's
policy). A user's policy has no training stage: it gets the offline and closed-loop
stages and a row in every table, correlation and figure of the report. Its stages are
keyed by its cache key (``cache_key()``, else its module's source and the files its
kwargs name); ``--no-cache`` runs them again regardless.

Checkpoints along training (Codevilla et al.'s protocol): ``checkpoints = [EPOCH, ...]`` on
a behaviour-cloning policy trains it once, keeping ``epoch_NN/`` (``TrainConfig.keep_epochs``),
and adds the study policy ``NAME-eNN`` per listed epoch, evaluated offline and in closed loop
like any other; the report's ``run`` column says which points come from one run. A policy
without ``checkpoints`` keeps its cache key. An epoch that early stopping never reaches has
no checkpoint: its stages are skipped (the log and the report say so); raise ``patience``
to ``epochs`` to guarantee every listed epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from steerloop.files import atomic_write_json
from steerloop.errors import SteerloopError
from steerloop.evaluation.suites import BUILTIN_SUITES, Suite, SuiteError, load_suite
from steerloop.paths import UnsafeNameError, path_under, safe_name, shorten
from steerloop.training.dagger import DaggerConfig
from steerloop.training.record import RecordConfig
from steerloop.training.train import STATE_DIR, TrainConfig, epoch_dir

STUDY_SCHEMA_VERSION = "1.0.0"
PRESETS_DIR = Path(__file__).resolve().parents[1] / "studies"
PRESETS = ("default", "demo", "history", "large")
KEY_LENGTH = 10  # hex digits of the content hash in stage directory names
NAME_MAX_MARKER = 200  # [bytes] of a stage marker's name before ".json" (shortened with a hash beyond)


class StudyError(SteerloopError):
    """A study file is malformed, or a stage cannot run; the message names the file and the field."""


@dataclass
class PolicySpec:
    """One policy of the population: a behaviour-cloning run, or DAgger from another policy."""

    name: str
    """Name in the study file (``[policies.NAME]``)."""
    family: str
    """Group label in the report (defaults to the architecture, ``dagger`` policies to ``dagger``)."""
    train: dict = field(default_factory=dict)
    """TrainConfig fields (behaviour cloning); ``data`` holds dataset names."""
    dagger: dict | None = None
    """DaggerConfig fields plus ``init`` (a policy name); None for behaviour cloning."""
    user: dict | None = None
    """A user's policy: {"policy": spec, "kwargs": {...}}; None for a policy the study trains."""
    checkpoint: dict | None = None
    """A checkpoint along another policy's training: {"run": that policy's name, "epoch": N}."""


@dataclass
class StudyConfig:
    """A whole study, parsed and checked (see the module docstring for the file format)."""

    name: str
    """Study name (used in the report title)."""
    path: str
    """The study file it was read from."""
    resolution: tuple[int, int] = (66, 200)
    """Camera image (H, W) [px] for recording and closed-loop evaluation."""
    suites: tuple[str, ...] = ("test", "recovery", "interventions")
    """Closed-loop suites: built-in names or suite JSON paths; the first is the primary suite."""
    offline_data: str = "val"
    """Name of the held-out dataset used for offline metrics (record it on the val split)."""
    threads: int = 2
    """torch threads for training (recorded in every checkpoint)."""
    datasets: dict[str, dict] = field(default_factory=dict)
    """RecordConfig fields per dataset name."""
    policies: dict[str, PolicySpec] = field(default_factory=dict)
    """The population, in file order."""
    short_loop: dict = field(default_factory=dict)
    """ShortLoopConfig fields (rollouts, horizon [s], warmup [s], seed) of the offline stage."""
    cells: dict[str, dict] = field(default_factory=dict)
    """Cell name -> {"offline_data": dataset name, "suite": suite (as in ``suites``)}."""

    def __post_init__(self):
        where = self.path
        if not self.policies:
            raise StudyError(f"{where}: no [policies.NAME] tables; a study needs at least one policy")
        for key, dataset in [("study.offline_data", self.offline_data),
                             *((f"cells.{name}.offline_data", cell["offline_data"]) for name, cell in self.cells.items())]:
            if dataset not in self.datasets:
                raise StudyError(f"{where}: {key} names {dataset!r}, which is not a [datasets.NAME] table "
                                 f"(have {sorted(self.datasets)})")
        if not self.suites:
            raise StudyError(f"{where}: study.suites is empty; name at least one suite, e.g. [\"test\"]")
        for name, spec in self.policies.items():
            if spec.user is not None or spec.checkpoint is not None:
                continue
            if spec.dagger is None:
                for key in ("data", "encoder_data"):
                    for dataset in spec.train.get(key, []):
                        if dataset not in self.datasets:
                            raise StudyError(f"{where}: policies.{name}.{key} names {dataset!r}, which is not a "
                                             f"[datasets.NAME] table (have {sorted(self.datasets)})")
                continue
            init = spec.dagger["init"]
            if init not in self.policies or list(self.policies).index(init) >= list(self.policies).index(name):
                raise StudyError(f"{where}: policies.{name}.dagger.init must name a policy defined above it, "
                                 f"got {init!r}")
            if self.policies[init].user is not None:
                raise StudyError(f"{where}: policies.{name}.dagger.init names {init!r}, a user policy; DAgger "
                                 "starts from a policy the study trains (it retrains that policy's model)")
            if self.policies[init].checkpoint is not None:
                run = self.policies[init].checkpoint["run"]
                raise StudyError(f"{where}: policies.{name}.dagger.init names {init!r}, a checkpoint along {run!r}'s "
                                 f"training; DAgger starts from a trained policy's best checkpoint: name {run!r}")


def _hash(value) -> str:
    text = json.dumps(value, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _tables(raw: dict, key: str, path: Path) -> dict[str, dict]:
    """``raw[key]`` (``[datasets.NAME]`` or ``[policies.NAME]`` tables), each NAME checked
    as a file name: it names the stage's directory under the study's output."""
    tables = raw.get(key, {})
    if not isinstance(tables, dict):
        raise StudyError(f"{path}: {key} must be tables [{key}.NAME], got {tables!r}")
    for name, table in tables.items():
        try:
            safe_name(name, field=f"[{key}.NAME] name", source=str(path))
        except UnsafeNameError as error:
            raise StudyError(str(error)) from None
        if not isinstance(table, dict):
            raise StudyError(f"{path}: {key}.{name} must be a table [{key}.{name}], got {table!r}")
    return tables
def _user_policy(table: dict, base: Path, where: str) -> dict:
    """{"policy": spec, "kwargs": {...}} of a ``[policies.NAME] policy = SPEC`` table, paths
    made relative to the study file's directory ``base``."""
    from steerloop.agents.spec import FILE_SPEC, MODULE_SPEC

    _check_keys(table, {"policy", "kwargs"}, where)
    spec, kwargs = table["policy"], table.get("kwargs", {})
    if not isinstance(spec, str) or not spec:
        raise StudyError(f"{where}: policy must be a policy spec string such as \"mypkg.models:load\", got {spec!r}")
    if not isinstance(kwargs, dict):
        raise StudyError(f"{where}: kwargs must be a table of keyword arguments, got {kwargs!r}")
    if spec in ("expert", "zeros") or spec.startswith("expert:"):
        raise StudyError(f"{where}: policy {spec!r} is built in; the study compares camera policies (the expert "
                         "needs privileged observations and cannot be replayed offline; zeros is every table's "
                         "reference row already)")
    match = FILE_SPEC.match(spec)
    if match:
        spec = f"{(base / match['file']).resolve()}:{match['attr']}"
    elif not MODULE_SPEC.match(spec) or (base / spec).exists():
        spec = str((base / spec).resolve())  # a checkpoint directory or a .zip
    kwargs = {key: str((base / value).resolve()) if isinstance(value, str) and value and (base / value).exists()
              else value for key, value in kwargs.items()}
    return {"policy": spec, "kwargs": kwargs}


def checkpoint_name(run: str, epoch: int) -> str:
    """The study policy of ``run``'s checkpoint after ``epoch``: ``RUN-eNN``."""
    return f"{run}-e{epoch:02d}"


def _checkpoint_epochs(value, epochs: int, where: str) -> list[int]:
    """The sorted epochs of a policy's ``checkpoints`` list, each within 1..epochs."""
    if not isinstance(value, list) or not value or any(isinstance(e, bool) or not isinstance(e, int) for e in value):
        raise StudyError(f"{where}: checkpoints must be a list of epochs such as [1, 2, 4], got {value!r}")
    outside = sorted({e for e in value if not 1 <= e <= epochs})
    if outside:
        raise StudyError(f"{where}: checkpoints: epoch(s) {outside} outside 1..epochs (1..{epochs}); list epochs "
                         "the run trains, or raise epochs")
    return sorted(set(value))


def _checkpoint_policies(name: str, spec: PolicySpec, taken, path: Path) -> dict[str, PolicySpec]:
    """One study policy per epoch in ``spec.train["keep_epochs"]``, named RUN-eNN (checked
    as a file name, and against the policy names ``taken``)."""
    policies = {}
    for epoch in spec.train.get("keep_epochs", []):
        child = checkpoint_name(name, epoch)
        try:
            safe_name(child, field=f"[policies.{name}] checkpoint policy name", source=str(path))
        except UnsafeNameError as error:
            raise StudyError(str(error)) from None
        if child in taken:
            raise StudyError(f"{path}: [policies.{name}] checkpoints: its policy {child!r} clashes with "
                             f"[policies.{child}]; rename one of them")
        policies[child] = PolicySpec(child, spec.family, checkpoint={"run": name, "epoch": epoch})
    return policies


def resolve_study_path(name_or_path: str) -> Path:
    """A preset name (``default``, ``demo``, ``history``, ``large``) or a study file path."""
    if name_or_path in PRESETS:
        return PRESETS_DIR / f"{name_or_path}.toml"
    path = Path(name_or_path)
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist; give a TOML study file or a preset {PRESETS}")
    return path


def load_study(name_or_path: str) -> StudyConfig:
    """Parse and check a study file (or preset); every error names the file and the field."""
    path = resolve_study_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise StudyError(f"{path}: not valid TOML ({error})") from None
    return parse_study(raw, path)


def parse_study(raw: dict, path: Path) -> StudyConfig:
    """A study from the parsed TOML ``raw`` of the file ``path`` (relative paths in it are
    relative to ``path``'s directory); every error names the file and the field."""
    path = Path(path)
    _check_keys(raw, {"study", "datasets", "policies", "cells"}, f"{path}")
    head = raw.get("study", {})
    _check_keys(head, {"name", "resolution", "suites", "offline_data", "threads", "short_loop"}, f"{path}: [study]")
    datasets_raw, policies_raw = _tables(raw, "datasets", path), _tables(raw, "policies", path)
    suites = [_suite_path(suite, path, "study.suites") for suite in head.get("suites", StudyConfig.suites)]
    short_loop = _short_loop(head.get("short_loop", {}), path)
    cells = {}
    for name, cell in _tables(raw, "cells", path).items():
        where = f"{path}: [cells.{name}]"
        _check_keys(cell, {"offline_data", "suite"}, where)
        if "offline_data" not in cell or "suite" not in cell:
            raise StudyError(f"{where}: a cell needs offline_data (a dataset name) and suite (one of study.suites)")
        suite = _suite_path(cell["suite"], path, f"cells.{name}.suite")
        if suite not in suites:
            raise StudyError(f"{where}: suite {cell['suite']!r} is not one of study.suites {head.get('suites')}; "
                             "add it there so the study runs it")
        cells[name] = {"offline_data": cell["offline_data"], "suite": suite}
    resolution = tuple(int(v) for v in head.get("resolution", (66, 200)))
    record_fields = _fields(RecordConfig) - {"out", "workers", "resolution", "learner", "beta", "mixture", "extra",
                                             "backend", "address"}
    datasets = {}
    for name, table in datasets_raw.items():
        where = f"{path}: [datasets.{name}]"
        _check_keys(table, record_fields, where)
        table = dict(table)
        if table.get("track"):
            table["track"] = str((path.parent / table["track"]).resolve())
        if isinstance(table.get("condition_file"), str):  # relative to the study file, like track
            table["condition_file"] = str((path.parent / table["condition_file"]).resolve())
        try:
            RecordConfig(out="unused", resolution=resolution, **table)
        except (ValueError, TypeError) as error:
            raise StudyError(f"{where}: {error}") from None
        datasets[name] = table
    train_fields = _fields(TrainConfig) - {"out", "init", "threads", "encoder", "keep_epochs"} | {"checkpoints"}
    dagger_fields = _fields(DaggerConfig) - {"out", "data", "workers", "backend", "address"}
    policies = {}
    for name, table in policies_raw.items():
        where = f"{path}: [policies.{name}]"
        table = dict(table)
        family = table.pop("family", None)
        if "policy" in table:
            policies[name] = PolicySpec(name, family or "user", user=_user_policy(table, path.parent, where))
            continue
        if "dagger" in table:
            _check_keys(table, {"dagger"}, where)
            dagger = dict(table["dagger"])
            _check_keys(dagger, dagger_fields, f"{where} dagger")
            if isinstance(dagger.get("condition_file"), str):  # relative to the study file, as for datasets
                dagger["condition_file"] = str((path.parent / dagger["condition_file"]).resolve())
            try:
                DaggerConfig(**{**dagger, "init": "unused", "data": ["unused"]})
            except (ValueError, TypeError) as error:
                raise StudyError(f"{where} dagger: {error}") from None
            policies[name] = PolicySpec(name, family or "dagger", dagger=dagger)
            continue
        _check_keys(table, train_fields, where)
        checkpoints = table.pop("checkpoints", None)
        table["data"] = list(table.get("data", []))
        if "encoder_data" in table:
            table["encoder_data"] = list(table["encoder_data"])
        try:
            TrainConfig(out="unused", **table)
        except (ValueError, TypeError) as error:
            raise StudyError(f"{where}: {error}") from None
        if checkpoints is not None:  # only then: a table without checkpoints keeps its train stage's key
            table["keep_epochs"] = _checkpoint_epochs(checkpoints, table.get("epochs", TrainConfig.epochs), where)
        policies[name] = PolicySpec(name, family or table.get("model", TrainConfig.model), train=table)
        policies.update(_checkpoint_policies(name, policies[name], {*policies_raw, *policies}, path))
    return StudyConfig(name=head.get("name", path.stem), path=str(path), resolution=resolution,
                       suites=tuple(suites), offline_data=head.get("offline_data", "val"),
                       threads=int(head.get("threads", 2)), datasets=datasets, policies=policies,
                       short_loop=short_loop, cells=cells)


def _suite_path(suite, path: Path, key: str) -> str:
    """A built-in suite name, or a suite file next to the study file (as an absolute path)."""
    if not isinstance(suite, str):
        raise StudyError(f"{path}: {key}: {suite!r} is not a string; give built-in suite names "
                         f"{BUILTIN_SUITES} or suite file paths")
    if suite in BUILTIN_SUITES:
        return suite
    if (path.parent / suite).is_file():
        return str((path.parent / suite).resolve())
    raise StudyError(f"{path}: {key}: {suite!r} is neither a built-in suite {BUILTIN_SUITES} "
                     f"nor a suite file next to the study file")


def _short_loop(table, path: Path) -> dict:
    """study.short_loop as ShortLoopConfig fields (every field filled in: it is part of stage keys)."""
    from steerloop.evaluation.short_loop import ShortLoopConfig, ShortLoopError

    if not isinstance(table, dict):
        raise StudyError(f"{path}: study.short_loop must be a table such as {{ rollouts = 16, horizon = 3.0 }}, "
                         f"got {table!r}")
    _check_keys(table, _fields(ShortLoopConfig), f"{path}: study.short_loop")
    try:
        config = ShortLoopConfig(**table)
        config.check()
    except ShortLoopError as error:
        raise StudyError(f"{path}: study.short_loop: {error}") from None
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------- stages
@dataclass
class Stage:
    """One cached unit of work."""

    kind: str
    """record, train, dagger, offline or closed_loop."""
    name: str
    """Dataset or policy name (plus the suite for closed_loop)."""
    key: str
    """Content hash of the stage's settings and of every stage it depends on."""
    out: Path
    """Where the stage writes (a directory, or a file for offline)."""
    params: dict = field(default_factory=dict)
    """What the stage needs to run."""

    @property
    def marker(self) -> str:
        """The file name of the stage's finished-marker (shortened, with a hash, if too long)."""
        return shorten(f"{self.kind}-{self.name}-{self.key}", NAME_MAX_MARKER) + ".json"


@dataclass
class StudyPlan:
    """Every stage of a study, in an order that respects dependencies."""

    config: StudyConfig
    out: Path
    datasets: dict[str, Stage]
    policies: dict[str, Stage]
    offline: dict[str, Stage]
    closed_loop: dict[tuple[str, str], Stage]
    suites: dict[str, Suite]
    cell_offline: dict[tuple[str, str], Stage] = field(default_factory=dict)
    """(policy, dataset) -> offline stage on a cell's dataset other than ``offline_data``."""

    @property
    def stages(self) -> list[Stage]:
        """Every stage that runs (a user policy's or a checkpoint's entry in ``policies`` is not one:
        nothing trains it, or its run's train stage does)."""
        trained = (s for s in self.policies.values() if s.kind not in ("user", "checkpoint"))
        return [*self.datasets.values(), *trained, *self.offline.values(), *self.cell_offline.values(),
                *self.closed_loop.values()]

    def offline_stage(self, policy: str, dataset: str) -> Stage:
        """The offline stage of ``policy`` on the held-out ``dataset``."""
        return self.offline[policy] if dataset == self.config.offline_data else self.cell_offline[(policy, dataset)]

    def checkpoint(self, policy: str) -> str:
        """The policy spec of a study policy: its trained checkpoint (a checkpoint policy's
        ``epoch_NN`` directory), or a user policy's spec."""
        stage = self.policies[policy]
        if stage.kind == "user":
            return stage.params["policy"]
        if stage.kind == "checkpoint":
            return str(stage.out)
        if stage.kind == "dagger":
            last = stage.params["config"]["iterations"] - 1
            return str(stage.out / f"iter_{last:02d}" / "model" / "best")
        return str(stage.out / "best")

    def missing_checkpoint(self, policy: str) -> str | None:
        """Why a checkpoint policy has no checkpoint after its run trained (early stopping
        ended the run before that epoch); None for a policy that has one, or any other policy."""
        stage = self.policies[policy]
        if stage.kind != "checkpoint" or (stage.out / "config.json").is_file():
            return None
        run = self.policies[stage.params["run"]]
        progress = run.out / STATE_DIR / "progress.json"
        stopped = json.loads(progress.read_text())["epoch"] if progress.is_file() else 0
        patience = stage.params["config"].get("patience", TrainConfig.patience)
        return (f"{policy}: {stage.params['run']} stopped early after epoch {stopped} (patience {patience}), so "
                f"epoch {stage.params['epoch']} was never reached; raise patience to epochs to keep every checkpoint")

    def policy_kwargs(self, policy: str) -> dict:
        """Keyword arguments of a user policy's class or factory ({} for a trained policy)."""
        stage = self.policies[policy]
        return dict(stage.params["kwargs"]) if stage.kind == "user" else {}

    def dataset_dirs(self, policy: str) -> list[str]:
        """The expert-labelled datasets a policy was trained on (DAgger: initial + every iteration)."""
        stage = self.policies[policy]
        if stage.kind == "user":
            return []
        if stage.kind == "checkpoint":
            return self.dataset_dirs(stage.params["run"])
        if stage.kind == "dagger":
            iterations = stage.params["config"]["iterations"]
            return [*self.dataset_dirs(stage.params["init"]),
                    *(str(stage.out / f"iter_{i:02d}" / "data") for i in range(iterations))]
        return [str(self.datasets[d].out) for d in stage.params["config"]["data"]]


def _user_fingerprint(cfg: StudyConfig, name: str, user: dict) -> str:
    """A user policy's cache key (loading it: a spec that does not load fails here, before any stage)."""
    from steerloop.agents.protocol import PolicyError, policy_capabilities
    from steerloop.agents.spec import policy_fingerprint, policy_ref

    where = f"{cfg.path}: [policies.{name}]"
    try:
        ref = policy_ref(user["policy"], user["kwargs"])
        policy = ref.load()
        if policy_capabilities(policy).requires_privileged:
            raise StudyError(f"{where}: policy {user['policy']!r} requires privileged observations; the study "
                             "replays policies on logged camera frames, so it needs a camera policy")
        return policy_fingerprint(ref, policy)
    except PolicyError as error:
        raise StudyError(f"{where}: {error}") from None


def plan_study(cfg: StudyConfig, out: str | Path) -> StudyPlan:
    """Stage keys and output paths; nothing runs."""
    out = Path(out)
    datasets = {}
    for name, table in cfg.datasets.items():
        record_cfg = RecordConfig(out="unused", resolution=cfg.resolution, **table)
        key = _hash({"record": record_cfg.dataset_config()})
        datasets[name] = Stage("record", name, key, path_under(out, "datasets", f"{name}-{key}"), {"config": table})
    policies = {}
    for name, spec in cfg.policies.items():
        if spec.user is not None:
            key = _hash({"user_policy": spec.user, "content": _user_fingerprint(cfg, name, spec.user)})
            policies[name] = Stage("user", name, key, out / "policies" / f"{name}-{key}", dict(spec.user))
        elif spec.checkpoint is not None:  # nothing runs: the run's train stage writes epoch_NN/
            run, epoch = policies[spec.checkpoint["run"]], spec.checkpoint["epoch"]
            key = _hash({"checkpoint": run.key, "epoch": epoch})
            policies[name] = Stage("checkpoint", name, key, epoch_dir(run.out, epoch),
                                   {"run": run.name, "epoch": epoch, "config": run.params["config"]})
        elif spec.dagger is None:
            train_cfg = {**spec.train, "threads": cfg.threads}
            data_keys = [datasets[d].key for d in spec.train["data"]]
            if spec.train.get("encoder_data"):  # chauffeur's encoder pretraining data
                data_keys.append([datasets[d].key for d in spec.train["encoder_data"]])
            key = _hash({"train": train_cfg, "data": data_keys})
            policies[name] = Stage("train", name, key, path_under(out, "policies", f"{name}-{key}"),
                                   {"config": train_cfg})
        else:
            dagger_cfg = DaggerConfig(**{k: v for k, v in spec.dagger.items() if k != "init"}, init="unused",
                                      data=["unused"])
            dagger = dataclasses.asdict(dagger_cfg)
            identity = dagger_cfg.run_config()  # conditions only when set; a condition file by its content
            for unused in ("init", "data", "out", "workers", "backend", "address"):
                dagger.pop(unused)
                identity.pop(unused, None)
            init = spec.dagger["init"]
            key = _hash({"dagger": identity, "init": policies[init].key, "resolution": list(cfg.resolution)})
            policies[name] = Stage("dagger", name, key, path_under(out, "policies", f"{name}-{key}"),
                                   {"config": dagger, "init": init})
    offline, cell_offline = {}, {}
    for dataset in dict.fromkeys([cfg.offline_data, *(cell["offline_data"] for cell in cfg.cells.values())]):
        for name, stage in policies.items():
            key = _hash({"policy": stage.key, "data": datasets[dataset].key, "short_loop": cfg.short_loop})
            if dataset == cfg.offline_data:
                offline[name] = Stage("offline", name, key, path_under(out, "offline", f"{name}-{key}"),
                                      {"user": stage.kind == "user", "data": dataset})
            else:
                cell_offline[(name, dataset)] = Stage("offline", f"{name}@{dataset}", key,
                                                      path_under(out, "offline", f"{name}-{dataset}-{key}"),
                                                      {"user": stage.kind == "user", "data": dataset, "policy": name})
    try:
        suites = {path: load_suite(path) for path in cfg.suites}
    except SuiteError as error:
        raise StudyError(f"{cfg.path}: study.suites: {error}") from None
    closed_loop = {}
    for name, stage in policies.items():
        for path, suite in suites.items():
            key = _hash({"policy": stage.key, "suite": suite.to_dict(), "resolution": list(cfg.resolution)})
            closed_loop[(name, suite.name)] = Stage("closed_loop", f"{name}@{suite.name}", key,
                                                    path_under(out, "closed_loop", f"{name}-{key}", suite.name),
                                                    {"suite": path, "policy": name, "user": stage.kind == "user"})
    return StudyPlan(cfg, out, datasets, policies, offline, closed_loop,
                     {suite.name: suite for suite in suites.values()}, cell_offline)


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, value)


def _run_stage(plan: StudyPlan, stage: Stage, *, workers: int, progress: bool, backend: str = "local",
               address: str | None = None) -> dict:
    """Run one stage (resuming whatever part of it already exists); returns its summary.
    ``backend``/``address`` choose where recording and evaluation tasks run (local worker
    processes or a Ray cluster); they never change a stage's content, so not its key."""
    where = {"workers": workers, "backend": backend, "address": address}
    from steerloop.evaluation.offline import evaluate_offline
    from steerloop.evaluation.runner import evaluate
    from steerloop.training.dagger import run_dagger
    from steerloop.training.record import record
    from steerloop.training.train import train

    cfg = plan.config
    if stage.kind == "record":
        summary = record(RecordConfig(out=str(stage.out), resolution=cfg.resolution, **where,
                                      extra={"study": cfg.name, "dataset": stage.name}, **stage.params["config"]),
                         progress=progress)
        return {key: value for key, value in summary.items() if key != "out"}
    if stage.kind == "train":
        config = dict(stage.params["config"])
        config["data"] = [str(plan.datasets[d].out) for d in config["data"]]
        config["encoder_data"] = [str(plan.datasets[d].out) for d in config.get("encoder_data", [])]
        summary = train(TrainConfig(out=str(stage.out), **config), progress_bar=progress)
        return {key: summary[key] for key in ("val_rmse", "zeros_rmse", "epochs_run", "seconds", "params")
                if key in summary}
    if stage.kind == "dagger":
        init = stage.params["init"]
        rows = run_dagger(DaggerConfig(init=plan.checkpoint(init), data=plan.dataset_dirs(init), out=str(stage.out),
                                       **where, **stage.params["config"]), progress=progress)
        return {"iterations": len(rows), "frames": [row["frames"] for row in rows]}
    if stage.kind == "offline":
        from steerloop.evaluation.short_loop import ShortLoopConfig

        name = stage.params.get("policy", stage.name)
        held_out = str(plan.datasets[stage.params.get("data", cfg.offline_data)].out)
        result = evaluate_offline(plan.checkpoint(name), held_out, out=str(stage.out / "offline.json"),
                                  series=str(stage.out / "replay.npz"), policy_kwargs=plan.policy_kwargs(name),
                                  name=name, short=ShortLoopConfig(**cfg.short_loop), progress=progress, **where)
        summary = {"rmse": result["model"]["rmse"], "zeros_rmse": result["zeros"]["rmse"]}
        if "short_loop" in result:
            summary["short_loop_departure_rate"] = result["short_loop"]["departure_rate"]
        return summary
    if stage.kind == "closed_loop":
        suite = load_suite(stage.params["suite"])
        name = stage.params["policy"]
        results = evaluate(plan.checkpoint(name), suite, stage.out, **where, policy_kwargs=plan.policy_kwargs(name),
                           resolution=cfg.resolution, progress=progress, plots=False)
        return {"success_rate": results["aggregate"]["success_rate"]}
    raise AssertionError(f"unknown stage kind {stage.kind!r}")


def run_study(cfg: StudyConfig, out: str | Path, *, workers: int = 1, progress: bool = True,
              backend: str = "local", address: str | None = None, no_cache: bool = False, log=print) -> dict:
    """Run (or resume) every stage not yet finished, then write the report; returns the
    study summary (also ``OUT/study.json``). ``no_cache`` runs the stages of user policies
    again (their outputs replaced) even when their cache key is unchanged."""
    from steerloop.evaluation import report as report_module
    from steerloop.evaluation.report import write_report

    plan = plan_study(cfg, out)
    markers = path_under(plan.out, "stages")
    markers.mkdir(parents=True, exist_ok=True)
    stages = plan.stages
    if no_cache:
        for stage in stages:
            if stage.params.get("user") and path_under(markers, stage.marker).exists():
                path_under(markers, stage.marker).unlink()
                shutil.rmtree(stage.out, ignore_errors=True)
    todo = [s for s in stages if not path_under(markers, s.marker).exists()]
    log(f"study {cfg.name}: {len(cfg.policies)} policies, {len(stages)} stages, "
        f"{len(stages) - len(todo)} cached, {len(todo)} to run")
    started = time.perf_counter()
    for n, stage in enumerate(todo, 1):
        elapsed = time.perf_counter() - started
        eta = f", ETA {elapsed / (n - 1) * (len(todo) - n + 1) / 60:.1f} min" if n > 1 else ""
        log(f"[{n}/{len(todo)}] {stage.kind} {stage.name} -> {stage.out} ({elapsed / 60:.1f} min elapsed{eta})")
        began = time.perf_counter()
        policy = stage.params.get("policy", stage.name) if stage.kind in ("offline", "closed_loop") else None
        missing = plan.missing_checkpoint(policy) if policy else None
        if missing:
            log(f"  skipped: {missing}")
            summary = {"skipped": missing}
        else:
            summary = _run_stage(plan, stage, workers=workers, progress=progress, backend=backend, address=address)
        _write_json(path_under(markers, stage.marker), {"kind": stage.kind, "name": stage.name, "key": stage.key,
                                             "out": str(stage.out), "seconds": time.perf_counter() - began,
                                             "summary": summary})
    report_dir = Path(report_module.__file__).parent  # the report package: every module of it
    report_code = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes()
                                          for p in sorted(report_dir.glob("*.py")))).hexdigest()
    report_key = _hash([s.key for s in stages] + [STUDY_SCHEMA_VERSION, report_code])
    study = {"schema_version": STUDY_SCHEMA_VERSION, "name": cfg.name, "config_file": cfg.path,
             "report_key": report_key,
             "stages": [{"kind": s.kind, "name": s.name, "key": s.key, "out": str(s.out)} for s in stages]}
    study_file = path_under(plan.out, "study.json")
    previous = json.loads(study_file.read_text()) if study_file.exists() else {}
    if todo or previous.get("report_key") != report_key or not (plan.out / "report.md").exists():
        log("writing the report")
        write_report(plan)
        _write_json(study_file, study)
    else:
        log(f"nothing to do: every stage is cached and {plan.out / 'report.md'} is up to date")
    return study
