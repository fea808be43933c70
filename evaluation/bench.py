"""``steerloop bench ...``: throughput measured side by side in one run; medians of repeats."""

from __future__ import annotations

import gc
import json
import os
import statistics
import time

import numpy as np
import torch

from steerloop.sim import imaging
from steerloop.sim.camera import body_camera_matrices, render
from steerloop.sim.conditions import GRADED, RICHEST, TRAFFIC
from steerloop.sim.env import LaneKeepEnv

BENCH_TRACK = 200_000  # the first test-split track


def _median_rate(fn, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of ``steps / seconds`` for ``fn(steps)``."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(steps)
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates)


# side by side: the first round's look, the default, the richest level condition, it with oncoming traffic,
# and the richest graded one
BENCH_CONDITIONS = ("flat", "default", RICHEST, TRAFFIC, GRADED)
DEFAULT_MIN_OVER_FLAT = 0.8  # the default condition keeps this fraction of the flat world's env steps/s
RICHEST_MIN_OVER_FLAT = 0.4  # the richest built-in conditions (level and graded) keep this fraction
ENV_OVERHEAD_MAX = 1.15  # env time over (bare render + bare physics) of the same scene


class _ConditionBench:
    """One environment in one condition, the camera poses of its expert drive and the four timed loops."""

    def __init__(self, condition: str, steps: int, resolution: tuple[int, int]):
        self.env = env = LaneKeepEnv(track=BENCH_TRACK, resolution=resolution, condition=condition)
        self.steps = steps
        env.reset(seed=0)
        vehicle, spec = env.vehicle, env.episode_cameras[0]
        self.poses = []  # camera poses along the env's own trajectory, so bare rendering sees the same scenes
        self.commands = []  # the expert's steering, replayed by the env and by bare physics
        self.gravity = []  # gravity in the car's frame per step (graded roads tilt it; level: straight down)
        self.traffic = []  # the moving cars' (body, position, orientation) per step, shown by bare rendering too
        for _ in range(steps):
            self.commands.append(np.array([env.expert_command()], np.float32))
            env.step(self.commands[-1])
            self.gravity.append(env._gravity)  # the gravity that step simulated under
            bodies = env.traffic_bodies.ids if env.traffic_bodies is not None else ()
            self.traffic.append([(body, *env.client.getBasePositionAndOrientation(body)) for body in bodies])
            # the pose the env renders from (on a graded road: the car mapped onto the road surface)
            self.poses.append(body_camera_matrices(env.client, spec, *env._camera_base(),
                                                   vehicle.params.wheel_radius))
        # the last pose's bare frame and depth buffer, for the image-formation effects alone
        self.frame, self.depth = render(env.client, spec.width, spec.height, *self.poses[-1], env.appearance.lighting,
                                        depth=True)

    def render_only(self, n: int) -> None:
        env, spec = self.env, self.env.episode_cameras[0]
        for (view, projection), cars in zip(self.poses[:n], self.traffic[:n]):
            for body, position, orientation in cars:  # the scene as the env showed it: its cars where they were
                env.client.resetBasePositionAndOrientation(body, position, orientation)
            render(env.client, spec.width, spec.height, view, projection, env.appearance.lighting)

    def physics_only(self, n: int) -> None:
        """The vehicle model driven as in the env: steering actuator, cruise control, gravity, PyBullet."""
        env, vehicle = self.env, self.env.vehicle
        speed = None if env.config.longitudinal else env.config.speed
        for command, gravity in zip(self.commands[:n], self.gravity[:n]):
            env._set_gravity(gravity)
            vehicle.apply(float(command[0]), speed)
            vehicle.step_physics(env.substeps)

    def image_formation(self, n: int) -> None:
        for _ in range(n):
            imaging.apply(self.frame, self.depth, self.env.effects)

    def env_steps(self, n: int) -> None:
        for command in self.commands[:n]:
            self.env.step(command)

    def timed(self) -> dict[str, float]:
        out = {}
        for key, loop in (("render_fps", self.render_only), ("physics_steps_per_s", self.physics_only),
                          ("env_steps_per_s", self.env_steps), ("image_formations_per_s", self.image_formation)):
            self.env.reset(seed=0)
            out[key] = _median_rate(loop, self.steps, 1)
        return out


def bench_env(steps: int = 300, repeats: int = 5, resolution: tuple[int, int] = (66, 200),
              conditions: tuple[str, ...] = BENCH_CONDITIONS) -> dict:
    """Bare getCameraImage frames/s and bare physics control-steps/s on the same scene, next
    to the environment's own steps/s, for each of ``conditions`` (flat, default, the richest level and graded ones, the
    richest with oncoming traffic: ``env_over_without_traffic`` is its env steps/s over the richest's),
    interleaved repeat by repeat and condition by condition.

    The car follows the expert along a test track (300 steps stay on the route, so no reset
    is timed); the env replays the expert's commands of that drive (the expert's own cost is the
    driver's, not the env's), bare rendering replays its camera poses and bare physics its
    commands through the vehicle model (steering actuator, cruise control, the gravity of a
    graded road, PyBullet's steps): a coasting car costs PyBullet about half as much as a driven one. Image-formation
    effects (fog, noise, blur, JPEG...) count as environment time in ``env_overhead_ratio``;
    ``image_formation_ms_per_frame`` is their cost alone (sim.imaging.apply on one frame and depth
    buffer of the drive), and ``env_over_simulator`` counts them as the simulator's work (the
    condition's camera model: bare render + image formation + bare physics). The top-level figures
    are the default condition's; ``conditions`` holds each one's, with its ratio to flat.
    """
    torch.set_num_threads(1)
    benches = {name: _ConditionBench(name, steps, resolution) for name in conditions}
    substeps = next(iter(benches.values())).env.substeps
    results = {name: {"render_fps": [], "physics_steps_per_s": [], "env_steps_per_s": [], "image_formations_per_s": []}
               for name in conditions}
    for _ in range(repeats):
        for name, bench in benches.items():
            for key, value in bench.timed().items():
                results[name][key].append(value)
    for bench in benches.values():
        bench.env.close()
    per_condition = {name: _summary(values) for name, values in results.items()}
    flat = per_condition.get("flat", per_condition[conditions[0]])["env_steps_per_s"]
    for row in per_condition.values():
        row["env_over_flat"] = round(row["env_steps_per_s"] / flat, 3)
    main = per_condition.get("default", per_condition[conditions[0]])
    if TRAFFIC in per_condition and RICHEST in per_condition:  # the moving cars' cost: same scene, cars or not
        per_condition[TRAFFIC]["env_over_without_traffic"] = round(
            per_condition[TRAFFIC]["env_steps_per_s"] / per_condition[RICHEST]["env_steps_per_s"], 3)
    return {
        "resolution": list(resolution),
        "steps_per_repeat": steps,
        "repeats": repeats,
        "physics_substeps_per_step": substeps,
        **{key: value for key, value in main.items() if key != "env_over_flat"},
        "target_env_overhead_ratio_max": ENV_OVERHEAD_MAX,
        "conditions": per_condition,
        "targets_over_flat_min": {"default": DEFAULT_MIN_OVER_FLAT, RICHEST: RICHEST_MIN_OVER_FLAT,
                                  GRADED: RICHEST_MIN_OVER_FLAT},
    }


def _summary(values: dict[str, list[float]]) -> dict:
    """Medians of one condition's rates, its env time over bare render + physics, and the time
    its image-formation effects (sim.imaging.apply, part of env time) take per frame."""
    med = {key: statistics.median(series) for key, series in values.items()}
    formation_ms = 1000.0 / med.pop("image_formations_per_s")  # [ms per frame]
    render_plus_physics = 1.0 / (1.0 / med["render_fps"] + 1.0 / med["physics_steps_per_s"])
    simulator = 1.0 / (1.0 / render_plus_physics + formation_ms / 1000.0)  # + the condition's camera model
    return {**{key: round(value, 1) for key, value in med.items()},
            "render_plus_physics_steps_per_s": round(render_plus_physics, 1),
            "env_overhead_ratio": round(render_plus_physics / med["env_steps_per_s"], 3),
            "image_formation_ms_per_frame": round(formation_ms, 3),
            "env_over_simulator": round(simulator / med["env_steps_per_s"], 3)}


SOAK_WARMUP_TRACKS = 50  # distinct tracks driven before the baseline RSS is read
SOAK_ALLOWED_GROWTH_MB = 50.0  # [MB] bound on RSS growth over 1,000 distinct tracks


def _rss_mb() -> float:
    """Resident set size of this process [MB] (psutil, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    return psutil.Process().memory_info().rss / 2 ** 20


def bench_soak(tracks: int = 1000, track_length: float = 400.0, resolution: tuple[int, int] = (66, 200),
               steps: int = 3, condition: str = "default") -> dict:
    """RSS growth of one environment over ``tracks`` distinct procedural training tracks.

    Every reset shows a new track (its road meshes are built) and drives ``steps``
    rendered steps. The baseline is read after ``SOAK_WARMUP_TRACKS`` other tracks, so
    one-off allocations (imports, the renderer's buffers) are not counted.
    """
    from steerloop.sim.track import split_seed

    env = LaneKeepEnv(resolution=resolution, track_length=track_length, condition=condition)
    zero = np.zeros(1, np.float32)

    def drive(index: int, seed: int) -> None:
        env.reset(seed=seed, options={"track": split_seed("train", index)})
        for _ in range(steps):
            env.step(zero)

    for i in range(SOAK_WARMUP_TRACKS):
        drive(99_999 - i, i)  # the last training tracks, never among the soaked ones
    gc.collect()
    before = _rss_mb()
    peak = before
    start = time.perf_counter()
    for i in range(tracks):
        drive(i, i)
        if (i + 1) % 100 == 0:
            peak = max(peak, _rss_mb())
    gc.collect()
    after = _rss_mb()
    seconds = time.perf_counter() - start
    env.close()
    growth = max(peak, after) - before
    return {
        "tracks": tracks, "track_length_m": track_length, "steps_per_track": steps, "condition": condition,
        "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1), "rss_peak_mb": round(max(peak, after), 1),
        "rss_growth_mb": round(growth, 1), "growth_per_track_kb": round(growth * 1024 / tracks, 2),
        "allowed_growth_mb_per_1000_tracks": SOAK_ALLOWED_GROWTH_MB, "tracks_per_s": round(tracks / seconds, 1),
    }


def format_table(title: str, rows: dict) -> str:
    """A two-column plain-text table of a bench result (nested results as ``outer.inner`` rows)."""
    flat = _flatten(rows)
    width = max(len(k) for k in flat)
    lines = [title, "-" * (width + 16)]
    lines += [f"{key:<{width}}  {value}" for key, value in flat.items()]
    return "\n".join(lines)


def _flatten(rows: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in rows.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _expert_env_rate(episodes: int, track_length: float, resolution) -> float:
    """Env steps/s of the clean expert over the recording's own episodes, nothing written."""
    from steerloop.agents.experts import ExpertPolicy
    from steerloop.training.record import RecordConfig, episode_jobs

    cfg = RecordConfig(out="unused", episodes=episodes, track_length=track_length, resolution=resolution)
    env = LaneKeepEnv(resolution=resolution, privileged=True, track_length=track_length)
    expert = ExpertPolicy()
    steps, start = 0, time.perf_counter()
    for job in episode_jobs(cfg):
        obs, info = env.reset(seed=job.reset_seed, options={"track": job.track, "condition": job.condition})
        terminated = False
        while not terminated:
            action, _ = expert.predict(obs)
            obs, _, terminated, _, info = env.step(action)
            steps += 1
    env.close()
    return steps / (time.perf_counter() - start)


def bench_record(episodes: int = 8, track_length: float = 300.0, resolution=(66, 200), repeats: int = 3) -> dict:
    """Recording frames/s (W=1 and W=2) next to the env's own steps/s, in one run."""
    import tempfile

    from steerloop.training.record import RecordConfig, record

    torch.set_num_threads(1)
    rates = {"env_steps_per_s": [], "record_w1_frames_per_s": [], "record_w2_frames_per_s": []}
    bytes_per_frame = None
    for _ in range(repeats):
        rates["env_steps_per_s"].append(_expert_env_rate(episodes, track_length, resolution))
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = RecordConfig(out=f"{tmp}/data", episodes=episodes, track_length=track_length,
                                   resolution=resolution, workers=workers)
                summary = record(cfg, progress=False)
                rates[f"record_w{workers}_frames_per_s"].append(summary["frames_per_s"])
                bytes_per_frame = json.loads(open(f"{tmp}/data/manifest.json").read())["bytes_per_frame"]
    med = {key: statistics.median(values) for key, values in rates.items()}
    return {
        "resolution": list(resolution), "episodes": episodes, "repeats": repeats,
        **{key: round(value, 1) for key, value in med.items()},
        "record_over_env_ratio": round(med["record_w1_frames_per_s"] / med["env_steps_per_s"], 3),
        "target_record_over_env_ratio_min": 0.8,
        "w2_over_w1_speedup": round(med["record_w2_frames_per_s"] / med["record_w1_frames_per_s"], 3),
        "target_w2_over_w1_speedup_min": 1.7,
        "bytes_per_frame": bytes_per_frame,
        "raw_bytes_per_frame": resolution[0] * resolution[1] * 3,
    }


def bench_train(data: str | None = None, steps: int = 20, repeats: int = 3, seq_len: int = 16,
                batch_frames: int = 128) -> dict:
    """cnn-lstm training samples/s through the real pipeline (windows, augmentation,
    preprocessing) next to the same model on tensors already in memory; and closed-loop
    stateful per-step inference next to re-running the whole T-frame window."""
    import tempfile

    from steerloop.agents.models import ModelConfig, build_model
    from steerloop.agents.preprocess import PreprocessConfig
    from steerloop.training.data import BatchMaker, load_episodes, windows
    from steerloop.training.record import RecordConfig, record
    from steerloop.training.train import prefetch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            data = f"{tmp}/data"
            record(RecordConfig(out=data, episodes=2, track_length=150.0), progress=False)
        episodes, reference = load_episodes([data], ("center",))
        height, width = reference["resolution"]
    config = ModelConfig(arch="cnn-lstm", preprocess=PreprocessConfig())
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    from steerloop.sim.camera import CameraSpec

    make_batch = BatchMaker(episodes, seq_len, config.preprocess, CameraSpec(height=height, width=width),
                            ("center",), ("shift", "jitter"))
    all_windows = windows(episodes, list(range(len(episodes))), seq_len, seq_len // 2)
    per_batch = batch_frames // seq_len
    rng = np.random.default_rng(0)
    fixed = make_batch(all_windows[:per_batch], rng)

    def train_step(batch):
        loss, _ = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def pipeline(n):  # exactly the trainer's loop: windows -> augment -> preprocess, prefetched
        for batch in prefetch(make_batch(all_windows[rng.integers(0, len(all_windows), per_batch)], rng)
                              for _ in range(n)):
            train_step(batch)

    def in_memory(n):
        for _ in range(n):
            train_step(fixed)

    rates = {"pipeline_samples_per_s": [], "in_memory_samples_per_s": []}
    for _ in range(repeats):
        rates["pipeline_samples_per_s"].append(_median_rate(pipeline, steps, 1) * batch_frames)
        rates["in_memory_samples_per_s"].append(_median_rate(in_memory, steps, 1) * batch_frames)
    # Inference: one stateful step vs the whole window, batch 1, one thread (closed loop).
    torch.set_num_threads(1)
    model.eval()
    frame = fixed["images"][:1, :1]  # (1, 1, 3, h, w)
    window = fixed["images"][:1]  # (1, T, 3, h, w)
    state = model.initial_state(1)
    with torch.no_grad():
        step_rate = _median_rate(lambda n: [model.step(frame[:, 0], state) for _ in range(n)], 50, repeats)
        window_rate = _median_rate(lambda n: [model.predict_sequence(window) for _ in range(n)], 10, repeats)
    med = {key: statistics.median(values) for key, values in rates.items()}
    return {
        "model": "cnn-lstm", "seq_len": seq_len, "batch_frames": batch_frames, "repeats": repeats,
        **{key: round(value, 1) for key, value in med.items()},
        "pipeline_over_in_memory_ratio": round(med["pipeline_samples_per_s"] / med["in_memory_samples_per_s"], 3),
        "target_pipeline_ratio_min": 0.9,
        "step_ms": round(1000 / step_rate, 3),
        "window_ms": round(1000 / window_rate, 3),
        "step_speedup_over_window": round(step_rate / window_rate, 2),
        "target_step_speedup_min": seq_len / 2,
        **bench_stateful_step(repeats=repeats, resolution=config.preprocess.resize),
    }


STATEFUL_MODELS = {"komanda": 10, "chauffeur": 50}  # arch -> the window [frames] it is trained on


def bench_stateful_step(repeats: int = 3, resolution: tuple[int, int] = (66, 200),
                        models: dict[str, int] | None = None) -> dict:
    """Per model, one closed-loop step carrying its state next to re-running its whole
    T-frame window each frame (what a model without state would do), batch 1, one thread.
    Komanda feeds back its own outputs, so its window pass steps through the window too."""
    from steerloop.agents.models import ModelConfig, build_model
    from steerloop.agents.preprocess import PreprocessConfig

    torch.set_num_threads(1)
    out = {}
    for arch, seq_len in (models or STATEFUL_MODELS).items():
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch=arch, preprocess=PreprocessConfig(resize=tuple(resolution)))).eval()
        window = torch.randn(1, seq_len, *model.input_shape)  # (1, T, 3, h, w)
        state = model.initial_state(1)
        with torch.no_grad():
            model.step(window[:, 0], state)  # warm-up
            step_rate = _median_rate(lambda n: [model.step(window[:, 0], state) for _ in range(n)], 50, repeats)
            window_rate = _median_rate(lambda n: [model.predict_sequence(window) for _ in range(n)], 5, repeats)
        out.update({f"{arch}_seq_len": seq_len, f"{arch}_step_ms": round(1000 / step_rate, 3),
                    f"{arch}_window_ms": round(1000 / window_rate, 3),
                    f"{arch}_step_speedup_over_window": round(step_rate / window_rate, 2)})
    return out


def _whole_route_suite(scenarios: int, track_length: float):
    """Test routes in intervention mode: an untrained policy is put back on the lane
    whenever it leaves it, so every scenario drives its whole route, as a trained policy
    does on a real suite (an untrained one would otherwise leave the road within seconds
    and the bench would time resets)."""
    from steerloop.evaluation.suites import Scenario, Suite, scenario_seed
    from steerloop.sim.track import split_seed

    return Suite("bench", tuple(Scenario(name=f"bench-{i}", track=split_seed("test", i), track_length=track_length,
                                         seed=scenario_seed("bench", i), interventions=True)
                                for i in range(scenarios)))


def _untrained_checkpoint(path: str) -> str:
    """An untrained cnn-lstm checkpoint (seeded), for timing closed-loop inference."""
    from steerloop.agents.checkpoint import save_checkpoint
    from steerloop.agents.models import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig(arch="cnn-lstm")
    save_checkpoint(path, build_model(config), config, {"note": "untrained, for benchmarking"})
    return path


def _replay(suite, trajectories: list[dict], resolution) -> int:
    """Step the scenarios' own environments (wrappers included) with the steering a
    closed-loop run executed, no policy; checks that the drive is reproduced exactly and
    returns the number of steps."""
    from steerloop.evaluation.runner import close_env_pool, make_env, reset_options

    steps = 0
    try:
        for scenario, trajectory in zip(suite.scenarios, trajectories):
            env = make_env(scenario, privileged=False, resolution=resolution)
            env.reset(seed=scenario.seed, options=reset_options(scenario))
            offsets = []
            for steering in trajectory["steering"]:
                _, _, _, _, info = env.step(np.array([steering], np.float32))
                offsets.append(info.get("offset_before_intervention", info["lateral_offset"]))
            steps += len(offsets)
            if not np.array_equal(offsets, trajectory["lateral_offset"]):
                raise RuntimeError(f"bench eval: replaying {scenario.name}'s steering did not reproduce its drive")
    finally:
        close_env_pool()
    return steps


def bench_eval(scenarios: int = 20, track_length: float = 200.0, repeats: int = 3, progress: bool = True,
               batch: int | None = None) -> dict:
    """Env-only steps/s next to closed-loop steps/s with a cnn-lstm checkpoint, and the
    speed-up of 2 evaluation workers over 1, repeat by repeat in one run.

    The routes are :func:`_whole_route_suite` (20 by default, as many as the ``test``
    suites). Closed loop is ``evaluate`` as ``steerloop evaluate`` runs it, lockstep groups
    of at most ``batch`` (default: the runner's), in this process for 1 worker and in fresh
    worker processes for 2 (start-up included), results and trajectories written. Env-only
    does the same simulation work without the policy: the scenarios' environments, wrappers
    and interventions included, stepped with the steering the closed-loop run executed
    (which reproduces its drive exactly, checked), so the ratio is the cost of the policy
    and the closed-loop machinery alone.
    """
    import tempfile

    from tqdm import tqdm

    from steerloop.evaluation.runner import DEFAULT_BATCH, evaluate

    batch = DEFAULT_BATCH if batch is None else batch
    resolution = (66, 200)
    torch.set_num_threads(1)
    suite = _whole_route_suite(scenarios, track_length)
    rates = {"env_steps_per_s": [], "closed_loop_w1_steps_per_s": [], "closed_loop_w2_steps_per_s": []}
    bar = tqdm(total=repeats * len(rates), desc="bench eval", unit="run", disable=not progress, dynamic_ncols=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _untrained_checkpoint(f"{tmp}/ckpt")
        reference = trajectories = None
        for r in range(repeats):
            for workers in (1, 2):
                out = f"{tmp}/eval-{r}-{workers}"
                start = time.perf_counter()
                results = evaluate(checkpoint, suite, out, workers=workers, resolution=resolution, progress=False,
                                   plots=False, batch=batch)
                total = sum(s["metrics"]["steps"] for s in results["scenarios"])
                rates[f"closed_loop_w{workers}_steps_per_s"].append(total / (time.perf_counter() - start))
                metrics = [s["metrics"] for s in results["scenarios"]]
                reference = reference or metrics
                if metrics != reference:
                    raise RuntimeError(f"bench eval: {workers} worker(s) gave different per-scenario metrics")
                bar.update(1)
                if trajectories is None:
                    trajectories = [dict(np.load(f"{out}/trajectories/{s.name}.npz")) for s in suite.scenarios]
                if workers == 1:
                    start = time.perf_counter()
                    steps = _replay(suite, trajectories, resolution)
                    rates["env_steps_per_s"].append(steps / (time.perf_counter() - start))
                    bar.update(1)
    bar.close()
    med = {key: statistics.median(values) for key, values in rates.items()}
    return {
        "scenarios": scenarios, "track_length_m": track_length, "batch": batch, "repeats": repeats,
        "closed_loop_steps": sum(m["steps"] for m in reference),
        "interventions": sum(m["interventions"] for m in reference),
        **{key: round(value, 1) for key, value in med.items()},
        "closed_loop_over_env_ratio": round(med["closed_loop_w1_steps_per_s"] / med["env_steps_per_s"], 3),
        "target_closed_loop_ratio_min": 0.8,
        "w2_over_w1_speedup": round(med["closed_loop_w2_steps_per_s"] / med["closed_loop_w1_steps_per_s"], 3),
        "target_w2_over_w1_speedup_min": 1.7,
        "identical_metrics": True,
        "replay_reproduces_drive": True,
    }


def bench_scale(scenarios: int = 16, track_length: float = 200.0, repeats: int = 3, progress: bool = True) -> dict:
    """Closed-loop evaluation throughput (scenario steps/s) with 1 and 2 local worker
    processes and with 2 Ray tasks on a local 2-CPU Ray instance, repeat by repeat in one
    run, and the Ray overhead relative to the local backend with the same 2 workers. The
    policy is an untrained cnn-lstm checkpoint driving whole routes (:func:`_whole_route_suite`).

    The Ray instance is started once before timing (as a cluster is, before commands use
    it); its start-up time is reported apart. Each evaluation starts its local worker
    processes afresh, while Ray keeps its worker processes between runs (each run still
    loads the policy in every worker), so the first Ray run is also reported on its own.
    """
    import tempfile

    import ray
    from tqdm import tqdm

    from steerloop.evaluation.runner import evaluate
    from steerloop.parallel import connect_ray

    torch.set_num_threads(1)
    suite = _whole_route_suite(scenarios, track_length)
    runs = (("local", 1), ("local", 2), ("ray", 2))
    rates: dict[str, list[float]] = {f"{backend}_w{workers}_steps_per_s": [] for backend, workers in runs}
    started_ray = not ray.is_initialized()
    start = time.perf_counter()
    connect_ray(None, num_cpus=2)
    ray_start_s = time.perf_counter() - start
    bar = tqdm(total=repeats * len(runs), desc="bench scale", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = _untrained_checkpoint(f"{tmp}/ckpt")
            reference = None
            for r in range(repeats):
                for backend, workers in runs:
                    out = f"{tmp}/eval-{r}-{backend}-{workers}"
                    start = time.perf_counter()
                    results = evaluate(checkpoint, suite, out, workers=workers, backend=backend, progress=False,
                                       plots=False)
                    seconds = time.perf_counter() - start
                    total = sum(s["metrics"]["steps"] for s in results["scenarios"])
                    rates[f"{backend}_w{workers}_steps_per_s"].append(total / seconds)
                    metrics = [s["metrics"] for s in results["scenarios"]]
                    if reference is None:
                        reference = metrics
                    elif metrics != reference:
                        raise RuntimeError(f"bench scale: {backend} with {workers} worker(s) gave different "
                                           "per-scenario metrics from the first run")
                    bar.update(1)
    finally:
        bar.close()
        if started_ray:
            ray.shutdown()
    med = {key: statistics.median(values) for key, values in rates.items()}
    return {
        "scenarios": scenarios, "track_length_m": track_length, "repeats": repeats,
        "ray_start_s": round(ray_start_s, 1),
        **{key: round(value, 1) for key, value in med.items()},
        "ray_w2_first_run_steps_per_s": round(rates["ray_w2_steps_per_s"][0], 1),
        "local_w2_over_w1_speedup": round(med["local_w2_steps_per_s"] / med["local_w1_steps_per_s"], 3),
        "ray_w2_over_local_w1_speedup": round(med["ray_w2_steps_per_s"] / med["local_w1_steps_per_s"], 3),
        "ray_overhead_vs_local_w2": round(1.0 - med["ray_w2_steps_per_s"] / med["local_w2_steps_per_s"], 3),
        "target_ray_overhead_max": 0.15,
        "identical_metrics": True,
    }
