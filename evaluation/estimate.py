"""``steerloop study --plan``: a study's stage counts, and an estimate of its compute from the
stage times another study measured (``--timings DIR``).

Every finished stage leaves ``OUT/stages/<marker>.json`` with its wall-clock ``seconds``. A
measured stage's core-seconds (its seconds x the cores it used: the ``threads`` of its
training config for training, ``--timings-cores`` for every other stage) divided by the work
it did gives a rate; a planned stage's work times the rate gives its core-seconds:

- record: per camera-km driven (episodes x route length x cameras);
- train: per 1000 frame-epochs (epochs x training frames x cameras, plus chauffeur's encoder
  pretraining epochs x its frames), one rate per architecture;
- dagger: its learner-driven recordings and retrainings at the record and train rates, times
  the measured / predicted ratio of the measured DAgger stages;
- offline: per held-out frame (of every dataset it runs on: ``offline_data`` and each cell's),
  one rate per architecture (the short closed loop's rollouts are charged in it);
- closed_loop: per nominal scenario step (route length / speed / control period), one rate per
  architecture.

An architecture without a measured rate gets the pooled rate of the measured ones, and a
stage kind never measured is left out of the totals; the output says both. Planned frames are
the nominal steps of the planned routes times the frames per nominal step measured in the
recordings. Training is charged its full ``epochs`` (early stopping can only shorten it).

Wall time follows ``run_study``: one stage after another; a recording spreads its episodes
and a closed-loop stage its lockstep groups over the workers (one core each); training and
offline metrics run in the driver on the study's ``threads`` cores.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from steerloop.errors import SteerloopError, read_json
from steerloop.evaluation.runner import DEFAULT_BATCH, lockstep_groups
from steerloop.evaluation.suites import CONTROL_DT
from steerloop.training.dagger import DaggerConfig
from steerloop.training.record import RecordConfig
from steerloop.training.train import TrainConfig

KINDS = ("record", "train", "dagger", "offline", "closed_loop")
UNITS = {"record": "core-s per camera-km", "train": "core-s per 1000 frame-epochs", "offline": "core-s per frame",
         "closed_loop": "core-s per scenario step", "dagger": "x the record and train rates"}
ALL = "*"  # the pooled rate of a kind over every measured architecture
CHECKPOINT_NAME = re.compile(r"^(?P<run>.+)-e\d{2,}$")  # RUN-eNN: a checkpoint along RUN's training


class EstimateError(SteerloopError):
    """The timings directory cannot give an estimate; the message names the file or flag."""


# ----------------------------------------------------------------------------- measured
@dataclass
class Timings:
    """Rates measured in a study's output directory."""

    root: Path
    samples: dict = field(default_factory=lambda: defaultdict(list))  # (kind, arch) -> [(core-s, work)]
    counts: Counter = field(default_factory=Counter)  # measured stages per kind
    fill: list = field(default_factory=list)  # (frames, nominal steps) of each recording
    dagger: list = field(default_factory=list)  # (core-s, measured dagger dir) until rates exist
    first: float = float("inf")  # [s since epoch] oldest and newest marker
    last: float = 0.0

    def rate(self, kind: str, arch: str = ALL) -> tuple[float | None, bool]:
        """(core-s per unit of work, True if ``arch``'s own) or (pooled rate, False); None if unmeasured."""
        own = self.samples.get((kind, arch))
        pairs = own or [p for (k, _), ps in self.samples.items() if k == kind for p in ps]
        work = sum(w for _, w in pairs)
        return (sum(c for c, _ in pairs) / work if work > 0 else None), bool(own)

    @property
    def frames_per_step(self) -> float:
        """Recorded frames per nominal step (route length / speed / control period)."""
        nominal = sum(n for _, n in self.fill)
        return sum(f for f, _ in self.fill) / nominal if nominal else 1.0


def _local(root: Path, recorded: str) -> Path:
    """A stage's output directory: as recorded in its marker, or the same tail under ``root``
    (a timings directory that was copied or moved)."""
    path = Path(recorded)
    if path.exists():
        return path
    for tail in (2, 3):
        candidate = root.joinpath(*path.parts[-tail:])
        if candidate.exists():
            return candidate
    raise EstimateError(f"--timings {root}: the stage output {recorded} is missing (looked under {root} too); give "
                        "a study output directory with its stages/ and the stage directories they name")


def _dataset_frames(root: Path, dataset: str) -> int:
    manifest = read_json(_local(root, dataset) / "manifest.json", "dataset manifest", EstimateError)
    return sum(int(e["length"]) for e in manifest["episodes"].values())


def _nominal_steps(length: float, speed: float) -> float:
    """Control steps to drive ``length`` metres at ``speed`` m/s."""
    return length / speed / CONTROL_DT


def _train_work(config: dict, epochs: int, frames) -> float:
    """1000 frame-epochs of a training run (``frames(datasets)`` counts its frames)."""
    cameras = 3 if config.get("camera") == "all" else 1
    work = epochs * frames(config["data"]) * cameras / 1000
    if config.get("model") == "chauffeur" and not config.get("encoder"):  # its encoder is pretrained first
        work += config.get("encoder_epochs", TrainConfig.encoder_epochs) * \
            frames(config.get("encoder_data") or config["data"]) / 1000
    return work


def read_timings(root: str | Path, cores: int) -> Timings:
    """The rates measured by the finished stages of the study output ``root``."""
    root = Path(root)
    markers = sorted((root / "stages").glob("*.json"))
    if not markers:
        raise EstimateError(f"--timings {root}: no stage markers in {root / 'stages'}; give the output directory of "
                            "a study that has run (at least partly)")
    timings, arch_of, pending = Timings(root), {}, []
    frames = lambda datasets: sum(_dataset_frames(root, d) for d in datasets)  # noqa: E731
    for path in markers:
        marker = read_json(path, "stage marker", EstimateError)
        try:
            kind, seconds, out = marker["kind"], float(marker["seconds"]), _local(root, marker["out"])
        except (KeyError, TypeError, ValueError) as error:
            raise EstimateError(f"{path}: not a study stage marker (kind, seconds and out are needed; {error!r})") \
                from None
        if marker.get("summary", {}).get("skipped"):
            continue
        timings.first, timings.last = min(timings.first, path.stat().st_mtime), max(timings.last, path.stat().st_mtime)
        timings.counts[kind] += 1
        if kind == "record":
            config = read_json(out / "manifest.json", "dataset manifest", EstimateError)["config"]
            km = config["episodes"] * config["track_length"] / 1000
            timings.samples[("record", ALL)].append((seconds * cores, km * len(config["cameras"])))
            timings.fill.append((_dataset_frames(root, str(out)),
                                 config["episodes"] * _nominal_steps(config["track_length"], config["speed"])))
        elif kind == "train":
            config = read_json(out / "train_config.json", "training config", EstimateError)
            arch_of[marker["name"]] = config["model"]
            work = _train_work(config, int(marker["summary"]["epochs_run"]), frames)
            timings.samples[("train", config["model"])].append((seconds * config["threads"], work))
        elif kind == "dagger":
            arch_of[marker["name"]] = read_json(out / "iter_00" / "model" / "train_config.json", "training config",
                                                EstimateError)["model"]
            timings.dagger.append((seconds * cores, out))
        else:
            pending.append((kind, marker, seconds * cores, out))
    for kind, marker, core_s, out in pending:  # architectures are known once every training marker is read
        policy = marker["name"].rsplit("@", 1)[0]
        run = CHECKPOINT_NAME.match(policy)
        arch = arch_of.get(policy) or (arch_of.get(run["run"]) if run else None) or ALL
        if kind == "offline":
            work = read_json(out / "offline.json", "offline metrics", EstimateError)["model"]["frames"]
        else:
            suite = read_json(out / "run.json", "closed-loop run", EstimateError)["suite"]
            work = sum(_nominal_steps(s["track_length"], s["speed"]) for s in suite["scenarios"])
        timings.samples[(kind, arch)].append((core_s, work))
    for core_s, out in timings.dagger:
        timings.samples[("dagger", ALL)].append((core_s, _measured_dagger_prediction(timings, root, out)))
    return timings


def _measured_dagger_prediction(timings: Timings, root: Path, out: Path) -> float:
    """What the record and train rates predict for a measured DAgger stage [core-s]."""
    state = read_json(out / "dagger.json", "DAgger state", EstimateError)
    config, core_s = state["config"], 0.0
    record_rate, _ = timings.rate("record")
    for i, _ in enumerate(state["iterations"]):
        train_config = read_json(out / f"iter_{i:02d}" / "model" / "train_config.json", "training config",
                                 EstimateError)
        progress = read_json(out / f"iter_{i:02d}" / "model" / "trainer_state" / "progress.json", "training progress",
                             EstimateError)
        train_rate, _ = timings.rate("train", train_config["model"])
        work = _train_work(train_config, int(progress["epoch"]),
                           lambda datasets: sum(_dataset_frames(root, d) for d in datasets))
        core_s += (record_rate or 0.0) * config["episodes_per_iter"] * config["track_length"] / 1000 + \
            (train_rate or 0.0) * work
    return core_s


# ----------------------------------------------------------------------------- planned
@dataclass
class Work:
    """One planned stage: its work in each kind's unit, and how far it spreads over workers."""

    kind: str
    name: str
    arch: str
    work: float  # in UNITS[kind] (dagger: record camera-km, train 1000 frame-epochs)
    parallel: int  # episodes or lockstep groups it spreads over (1: runs in the driver)
    train_work: float = 0.0  # dagger: its retrainings' 1000 frame-epochs


def _arch(plan, policy: str) -> str:
    stage = plan.policies[policy]
    if stage.kind == "user":
        return ALL
    if stage.kind == "dagger":
        return _arch(plan, stage.params["init"])
    return stage.params["config"].get("model", TrainConfig.model)


def planned_work(plan, frames_per_step: float = 1.0) -> list[Work]:
    """The work of every stage of ``plan`` (recordings' frames = nominal steps x ``frames_per_step``)."""
    records = {name: RecordConfig(out="unused", resolution=plan.config.resolution, **stage.params["config"])
               for name, stage in plan.datasets.items()}
    episode_frames = {name: _nominal_steps(r.track_length, r.speed) * frames_per_step for name, r in records.items()}
    frames = lambda names: sum(records[n].episodes * episode_frames[n] for n in names)  # noqa: E731
    work = [Work("record", name, ALL, r.episodes * r.track_length * len(r.cameras) / 1000, r.episodes)
            for name, r in records.items()]
    policy_frames = {}
    for name, stage in plan.policies.items():
        if stage.kind == "train":
            config = stage.params["config"]
            epochs = config.get("epochs", TrainConfig.epochs)
            work.append(Work("train", name, _arch(plan, name), _train_work(config, epochs, frames), 1))
            policy_frames[name] = frames(config["data"])
        elif stage.kind == "dagger":
            config = DaggerConfig(**stage.params["config"], init="unused", data=["unused"])
            per_iteration = config.episodes_per_iter * _nominal_steps(config.track_length, RecordConfig.speed) \
                * frames_per_step
            start = policy_frames[stage.params["init"]]
            train_work = sum(config.epochs * (start + (i + 1) * per_iteration) / 1000 for i in range(config.iterations))
            work.append(Work("dagger", name, _arch(plan, name),
                             config.iterations * config.episodes_per_iter * config.track_length / 1000,
                             config.episodes_per_iter, train_work))
            policy_frames[name] = start + config.iterations * per_iteration
        elif stage.kind == "checkpoint":
            policy_frames[name] = policy_frames[stage.params["run"]]
    held_out = frames([plan.config.offline_data])
    work += [Work("offline", name, _arch(plan, name), held_out, 1) for name in plan.offline]
    work += [Work("offline", stage.name, _arch(plan, name), frames([dataset]), 1)  # a cell's held-out logs
             for (name, dataset), stage in plan.cell_offline.items()]
    for (name, suite_name), stage in plan.closed_loop.items():
        scenarios = plan.suites[suite_name].scenarios
        work.append(Work("closed_loop", stage.name, _arch(plan, name),
                         sum(_nominal_steps(s.track_length, s.speed) for s in scenarios),
                         len(lockstep_groups(len(scenarios), DEFAULT_BATCH))))
    return work


# ----------------------------------------------------------------------------- estimate
def estimate(plan, timings: Timings, workers: int) -> dict:
    """{kind: {"stages", "core_s", "wall_s", "unmeasured", "pooled": [archs]}} and "total"
    (core-s and wall-s over the kinds that have a rate) for ``workers`` workers."""
    threads = plan.config.threads
    dagger_factor, _ = timings.rate("dagger")
    out = {kind: {"stages": 0, "core_s": 0.0, "wall_s": 0.0, "unmeasured": 0, "pooled": set()} for kind in KINDS}
    for item in planned_work(plan, timings.frames_per_step):
        row = out[item.kind]
        row["stages"] += 1
        if item.kind == "dagger":
            record_rate, _ = timings.rate("record")
            train_rate, own = timings.rate("train", item.arch)
            if None in (dagger_factor, record_rate, train_rate):
                row["unmeasured"] += 1
                continue
            record_s, train_s = record_rate * item.work * dagger_factor, train_rate * item.train_work * dagger_factor
            row["core_s"] += record_s + train_s
            row["wall_s"] += record_s / min(workers, item.parallel) + train_s / threads
        else:
            rate, own = timings.rate(item.kind, item.arch)
            if rate is None:
                row["unmeasured"] += 1
                continue
            core_s = rate * item.work
            row["core_s"] += core_s
            row["wall_s"] += core_s / (threads if item.kind in ("train", "offline") else min(workers, item.parallel))
        if not own and item.arch != ALL:
            row["pooled"].add(item.arch)
    measured = [out[k] for k in KINDS if out[k]["stages"] > out[k]["unmeasured"]]
    out["total"] = {"core_s": sum(r["core_s"] for r in measured), "wall_s": sum(r["wall_s"] for r in measured)}
    return out


def _rate_text(timings: Timings, kind: str) -> str:
    archs = sorted(a for k, a in timings.samples if k == kind and a != ALL)
    if kind == "dagger":
        factor, _ = timings.rate("dagger")
        return f"{factor:.2f} x the record and train rates" if factor else "not measured"
    if not archs:
        rate, _ = timings.rate(kind)
        return f"{rate:.4g} {UNITS[kind]}" if rate else "not measured"
    return ", ".join(f"{a} {timings.rate(kind, a)[0]:.4g}" for a in archs) + f" {UNITS[kind]}"


def plan_text(plan, timings_dir: str | None = None, *, workers: int = 2, cores: int = 2) -> str:
    """What ``steerloop study --plan`` prints: stage counts, and with ``timings_dir`` the estimate."""
    kinds = Counter(s.kind for s in plan.stages)
    policies = Counter(s.kind for s in plan.policies.values())
    parts = [f"{policies['train'] + policies['dagger']} training runs",
             *([f"{policies['user']} user policies"] if policies["user"] else []),
             *([f"{policies['checkpoint']} checkpoints along training"] if policies["checkpoint"] else [])]
    lines = [f"study {plan.config.name}: {len(plan.policies)} policies ({', '.join(parts)}), {len(plan.stages)} stages",
             *[f"  {kind:<12} {kinds[kind]:>4}" for kind in KINDS if kinds[kind]],
             f"  closed loop: {len(plan.suites)} suites x {len(plan.policies)} policies "
             f"({', '.join(f'{n} {len(s.scenarios)} scenarios' for n, s in plan.suites.items())})"]
    if timings_dir is None:
        return "\n".join([*lines, "no compute estimate: give --timings DIR, the output directory of a study that has "
                                  "run (its OUT/stages/*.json hold the measured stage times)"])
    timings = read_timings(timings_dir, cores)
    result = estimate(plan, timings, workers)
    when = " to ".join(dict.fromkeys(datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                                     for t in (timings.first, timings.last)))
    lines += ["", f"estimate from {sum(timings.counts.values())} measured stages in {timings.root} (finished {when}; "
                  f"{cores} cores there; training at its recorded threads)",
              f"  {'kind':<12} {'stages':>6} {'measured':>8} {'core-h':>8} {'wall-h':>8}  rate "
              f"(wall with {workers} workers, {plan.config.threads} driver threads)"]
    for kind in KINDS:
        row = result[kind]
        if row["stages"]:
            lines.append(f"  {kind:<12} {row['stages']:>6} {timings.counts[kind]:>8} {row['core_s'] / 3600:>8.2f} "
                         f"{row['wall_s'] / 3600:>8.2f}  {_rate_text(timings, kind)}")
    total = result["total"]
    lines.append(f"  {'total':<12} {len(plan.stages):>6} {sum(timings.counts.values()):>8} "
                 f"{total['core_s'] / 3600:>8.2f} {total['wall_s'] / 3600:>8.2f}")
    for kind in KINDS:
        row = result[kind]
        if row["unmeasured"]:
            lines.append(f"  not in the totals: {row['unmeasured']} {kind} stages (no measured {kind} stage"
                         + (" or record/train rate" if kind == "dagger" else "") + ")")
        if row["pooled"]:
            lines.append(f"  {kind}: no measured {', '.join(sorted(row['pooled']))} stage; used the pooled rate of "
                         "the measured architectures")
    return "\n".join(lines)
