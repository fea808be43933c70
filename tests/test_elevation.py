"""Roads with grade and banking (issue 19, "Elevation"): the profile, the world built on it, the car
driving on it, the lane geometry the expert reads, and what stays unchanged on level roads."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
from helpers import TINY, drive_with_expert_label

from steerloop.sim import conditions, scene
from steerloop.sim.env import LaneKeepEnv
from steerloop.sim.track import generate_track, split_seed
from steerloop.sim.track.elevation import FLAT_START, GRADE_FILL

HILLY = split_seed("test", 3)  # a test track whose first 150 m climb 2.7 m and fall again under `hills`
ROUTE = 150.0  # [m] procedural route length used here (fast)


def _elevation(name: str, track=None):
    track = track if track is not None else generate_track(HILLY, length=ROUTE)
    return scene.road_elevation(track, conditions.SCENERY[name], name)


def _env(condition: str = "hills.noon", **config) -> LaneKeepEnv:
    return LaneKeepEnv(track=HILLY, track_length=ROUTE, resolution=TINY, condition=condition, **config)


# ----------------------------------------------------------------------------- the profile
@pytest.mark.parametrize("name", ["hills", "mountain"])
def test_profile_keeps_to_the_grade_and_bank_and_starts_level(name):
    scenery = conditions.SCENERY[name]
    for index in range(6):
        track = generate_track(split_seed("train", index), length=400.0)
        elevation = _elevation(name, track)
        s = np.linspace(0.0, track.length, 40_001)
        grade = elevation.grade_at(s)
        assert np.abs(grade).max() <= scenery.grade  # the steepest point is GRADE_FILL x grade ...
        assert np.abs(grade).max() == pytest.approx(GRADE_FILL * scenery.grade, rel=1e-3)  # ... so it is graded
        bank = elevation.superelevation(s)
        assert np.abs(bank).max() < math.radians(scenery.bank_deg)
        assert np.abs(bank).max() > 0.5 * math.radians(scenery.bank_deg)  # its curves are banked (short ones less)
        start = s <= FLAT_START
        assert np.all(elevation.height(s[start]) == 0.0) and np.all(grade[start] == 0.0)


def test_grade_is_the_exact_derivative_of_the_height():
    elevation = _elevation("mountain")
    s = np.linspace(0.0, elevation.track.length, 30_001)
    finite = np.gradient(elevation.height(s), s)
    np.testing.assert_allclose(elevation.grade_at(s)[1:-1], finite[1:-1], atol=1e-5)


def test_curves_bank_inwards():
    elevation = _elevation("mountain", generate_track(split_seed("train", 0), length=400.0))
    s = np.linspace(0.0, elevation.track.length, 4001)
    curvature, bank = elevation.track.curvature_at(s), elevation.superelevation(s)
    sharp = np.abs(curvature) > 1 / 60  # [1/m] well inside a curve
    assert sharp.sum() > 50 and np.all(np.sign(bank[sharp]) == -np.sign(curvature[sharp]))  # left curve: left edge down


def test_profile_is_a_fixed_function_of_track_and_scenery():
    a, b = _elevation("hills"), _elevation("hills")
    s = np.linspace(0.0, a.track.length, 997)
    assert np.array_equal(a.height(s), b.height(s)) and np.array_equal(a.superelevation(s), b.superelevation(s))
    other = scene.road_elevation(a.track, conditions.SCENERY["hills"], "other-hills")  # the same values, another name
    assert not np.array_equal(other.height(s), a.height(s))
    assert scene.road_elevation(a.track, conditions.SCENERY["rural"], "rural") is None  # level: nothing changes


def test_bad_elevation_values_are_refused_naming_the_field(tmp_path):
    with pytest.raises(conditions.ConditionError, match=r"Scenery.grade must be within \[0, 0.1\], got 0.2"):
        conditions.Scenery(grade=0.2)
    with pytest.raises(conditions.ConditionError, match=r"Scenery.bank_deg must be within \[0, 6\], got -1"):
        conditions.Scenery(bank_deg=-1)
    path = tmp_path / "mine.toml"
    path.write_text('[scenery.steep]\nbase = "rural"\ngrade = 0.15\n')
    with pytest.raises(conditions.ConditionError, match=r"mine.toml: scenery.steep.grade \[fraction, 0.06 = 6 %\]: "
                                                        r"must be a number in \[0, 0.1\], got 0.15"):
        conditions.load_condition_file(path)
    path.write_text('[scenery.steep]\nbase = "rural"\ngrade = 0.1\nbank_deg = "steep"\n')
    with pytest.raises(conditions.ConditionError, match=r"scenery.steep.bank_deg \[deg\]: must be a number in \[0, 6\]"):
        conditions.load_condition_file(path)
    path.write_text('[scenery.steep]\nbase = "rural"\ngrade = 0.1\nbank_deg = 6\n')
    assert conditions.load_condition_file(path).scenery["steep"].grade == 0.1


def test_level_values_keep_their_recorded_identity(tmp_path):
    """grade and bank_deg are later fields: values that leave them at 0 record what they recorded before."""
    path = tmp_path / "mine.toml"
    path.write_text('[scenery.flatland]\nbase = "rural"\n[scenery.hilly]\nbase = "rural"\ngrade = 0.05\n')
    values = conditions.read_condition_file(path).values(["flatland.noon", "hilly.noon"])
    assert "grade" not in values["flatland.noon"]["scenery"] and "bank_deg" not in values["flatland.noon"]["scenery"]
    assert values["hilly.noon"]["scenery"]["grade"] == 0.05 and "bank_deg" not in values["hilly.noon"]["scenery"]


def test_new_built_in_conditions_and_their_splits():
    assert conditions.BUILTIN.split("rural-hills") == "train" and conditions.BUILTIN.split("mountain-fog") == "held_out"
    assert "rural-hills" in conditions.training_conditions() and "mountain-fog" in conditions.held_out_conditions()
    assert (conditions.SCENERY["hills"].grade, conditions.SCENERY["hills"].bank_deg) == (0.06, 3.0)
    assert (conditions.SCENERY["mountain"].grade, conditions.SCENERY["mountain"].bank_deg) == (0.08, 5.0)


# ----------------------------------------------------------------------------- the world on it
def test_terrain_meets_the_road_and_the_far_ground_lies_below_it():
    elevation = _elevation("mountain")
    sections = scene._sections(elevation.track, elevation)
    vertices, triangles, level = scene.terrain_mesh(elevation, sections)
    assert triangles.max() < len(vertices) and vertices[:, 2].min() >= level + scene.GROUND_Z - 1e-9
    ends, columns = len(scene.TERRAIN_ENDS), len(scene.TERRAIN_COLUMNS)
    grid = vertices.reshape(len(sections) + 2 * ends, 2 * columns + 2, 3)[ends:-ends]  # the road's sections
    for column, edge in ((columns, elevation.edges[0]), (columns + 1, elevation.edges[1])):
        # the ground starts GROUND_Z under the asphalt's edges: no gap, no step
        np.testing.assert_allclose(grid[:, column], np.stack(elevation.surface(sections, edge), axis=1)
                                   + [0.0, 0.0, scene.GROUND_Z], atol=1e-9)
    road = elevation.height(np.linspace(0.0, elevation.track.length, 500))
    assert level < road.min() - 0.5  # the far ground plane cannot poke through a dip


def test_objects_stand_on_the_ground():
    from steerloop.sim.scenery import GROUND_Z, SINK, object_meshes

    elevation = _elevation("mountain")
    meshes = object_meshes(elevation.track, conditions.SCENERY["mountain"], "mountain", ground=elevation.ground)
    trunks = meshes["trunk"][0].reshape(-1, 8, 3)  # boxes of 8 corners: the first 4 at the base
    base = trunks[:, :4].mean(axis=1)
    ground = elevation.ground(base[:, 0], base[:, 1]) + GROUND_Z
    assert np.ptp(ground) > 1.0  # the trees stand at many heights ...
    np.testing.assert_allclose(base[:, 2], ground - SINK, atol=1e-9)  # ... each on the ground under it


# ----------------------------------------------------------------------------- the car on it
def test_the_car_drives_on_the_surface_and_the_camera_follows_it():
    env = _env()
    try:
        _, info = env.reset(seed=0)
        heights, gaps, pitches, contacts = [], [], [], []
        while True:
            _, _, terminated, truncated, info = env.step(np.array([info["expert_steering"]], np.float32))
            position, orientation = env._camera_base()
            axes = np.asarray(env.client.getMatrixFromQuaternion(orientation)).reshape(3, 3)
            below = np.asarray(position) - env.vehicle_params.wheel_radius * axes[:, 2]  # under the base
            _, _, z = env.elevation.surface(info["progress"], info["lateral_offset"])
            heights.append(float(z))
            gaps.append(below[2] - z)
            pitches.append(-math.asin(axes[2, 0]) + math.atan(env.elevation.grade_at(info["progress"])))
            touching = {point[3] for point in env.client.getContactPoints(bodyA=env.vehicle.body_id) if point[9] > 0}
            contacts.append(touching == set(env.vehicle.wheel_links))
            if terminated or truncated:
                break
    finally:
        env.close()
    assert info["success"] and all(contacts)  # all four wheels on the road at every step
    assert np.ptp(heights) > 2.0  # it climbed and descended ...
    assert np.abs(gaps).max() < 0.02  # ... its wheels within 2 cm of the road surface ...
    assert np.abs(pitches).max() < 0.01  # ... pitched with the road (within 0.6 deg)


def test_gravity_along_the_grade_is_felt_and_the_cruise_holds_the_speed():
    env = LaneKeepEnv(track=split_seed("test", 0), track_length=ROUTE, resolution=TINY, condition="mountain.noon")
    try:  # this route climbs and falls at up to 6 %
        _, infos = drive_with_expert_label(env, seed=0)
        rows = [(float(env.elevation.grade_at(info["progress"])), info["throttle"], info["speed"]) for info in infos]
    finally:
        env.close()
    grade, throttle, speed = np.array(rows[40:]).T
    uphill, downhill = grade > 0.03, grade < -0.03
    assert uphill.sum() > 10 and downhill.sum() > 10
    assert throttle[uphill].mean() > 0.05 and throttle[downhill].mean() < -0.04  # pulling up, braking down
    assert np.abs(speed - 10.0).max() < 0.3  # [m/s] 3 % of the target speed


def test_the_ride_is_as_smooth_as_on_a_level_road():
    """Accelerations of the car body, step to step: a graded road adds the grade's and bank's slow
    changes, no bumps (a triangle-mesh road made the wheels leave the road at triangle edges)."""
    def jerks(condition: str) -> np.ndarray:
        env = _env(condition)
        try:
            _, info = env.reset(seed=0)
            velocities = []
            for _ in range(250):
                _, _, _, _, info = env.step(np.array([info["expert_steering"]], np.float32))
                velocities.append(env.client.getBaseVelocity(env.vehicle.body_id)[0])
        finally:
            env.close()
        acceleration = np.diff(velocities, axis=0) / env.dt
        return np.abs(np.diff(acceleration, axis=0)).max(axis=0)

    level, graded = jerks("rural.noon"), jerks("mountain.noon")
    assert graded[2] < 0.05  # [m/s^2] vertical: nothing
    assert np.all(graded[:2] < level[:2] + 0.5)  # horizontal: what steering does


def test_the_horizon_moves_with_the_grade():
    """Climbing pitches the camera up: the sky reaches lower down the frame than when descending."""
    env = LaneKeepEnv(track=HILLY, track_length=ROUTE, resolution=(66, 200), condition="mountain.noon",
                      extra_observations=("semantic",))
    try:
        elevation = _elevation("mountain")
        s = np.arange(30.0, 130.0, 0.5)
        grade = elevation.grade_at(s)
        sky_rows = {}
        for name, where in (("climbing", s[np.argmax(grade)]), ("descending", s[np.argmin(grade)])):
            obs, _ = env.reset(seed=0, options={"start_s": float(where)})
            sky = obs["semantic"][..., 0] == scene.SKY
            sky_rows[name] = sky.sum(axis=0).mean()  # [rows] of sky per column
        pitch = math.atan(grade.max()) - math.atan(grade.min())  # [rad] between the two
    finally:
        env.close()
    expected = math.degrees(pitch) / env.config.fov_deg * 66  # [rows] the horizon moves
    assert sky_rows["climbing"] - sky_rows["descending"] == pytest.approx(expected, rel=0.35)


# ----------------------------------------------------------------------------- lane geometry
def test_offset_is_measured_in_the_banked_plane():
    elevation = _elevation("mountain")
    s = np.arange(25.0, ROUTE, 0.5)
    where = float(s[np.argmax(np.abs(elevation.superelevation(s)))])
    bank = float(elevation.superelevation(where))
    assert abs(bank) > math.radians(4.0)
    env = _env("mountain.noon")
    try:
        for offset in (-0.8, 0.0, 1.2):
            _, info = env.reset(seed=0, options={"start_s": where, "start_offset": offset})
            position, orientation = env._camera_base()
            axes = np.asarray(env.client.getMatrixFromQuaternion(orientation)).reshape(3, 3)
            below = np.asarray(position) - env.vehicle_params.wheel_radius * axes[:, 2]
            centre = np.stack(elevation.surface(info["progress"], 0.0))
            across = np.stack(elevation.surface(info["progress"], 1.0)) - centre  # a unit step across the road
            geometric = float((below - centre) @ across)  # [m] the car's offset along the banked road
            assert info["lateral_offset"] == pytest.approx(offset, abs=1e-6)
            assert info["lateral_offset"] == pytest.approx(geometric, abs=0.01)
            assert abs(geometric - offset * math.cos(bank)) > 0.001 or offset == 0.0  # not the plan-view offset
            assert info["heading_error"] == pytest.approx(0.0, abs=1e-6)
    finally:
        env.close()


def test_a_push_moves_the_car_across_the_banked_road():
    env = _env("mountain.noon")
    try:
        _, info = env.reset(seed=0, options={"start_s": 60.0})
        before = env.lane.offset
        env.shift_lateral(0.7)
        assert env.lane.offset - before == pytest.approx(0.7, abs=0.005)
        env.kick_heading(0.1)
        assert env.lane.heading_error == pytest.approx(0.1, abs=1e-6)
    finally:
        env.close()


# mountain-fog is slow-only here: the slow 2x2 test drives it on every shift/generalization route
@pytest.mark.parametrize("condition", ["rural-hills", pytest.param("mountain-fog", marks=pytest.mark.slow)])
def test_the_expert_completes_graded_routes(condition):
    env = LaneKeepEnv(resolution=TINY, track_length=250.0, condition=condition)
    try:
        # one route each here; the slow 2x2 test drives every test/shift/generalization route
        info, _ = drive_with_expert_label(env, seed=0, options={"track": split_seed("test", 10)})
        assert info["success"] and info["departures"] == 0
    finally:
        env.close()


# ----------------------------------------------------------------------------- determinism
def test_a_restart_from_a_logged_state_on_a_hill_shows_the_logged_frame():
    from steerloop.evaluation.short_loop import logged_start

    env = _env("mountain.noon")
    try:
        obs, info = env.reset(seed=4)
        rows, frames, steering = [info], [obs["image"].copy()], []
        for _ in range(90):
            steering.append(env.expert_command() + 0.1 * math.sin(len(steering) / 5))  # off centre, turning
            obs, *_, info = env.step(np.array([steering[-1]], np.float32))
            rows.append(info)
            frames.append(obs["image"].copy())
        data = {key: np.array([row[key] for row in rows]) for key in
                ("progress", "lateral_offset", "heading_error", "speed", "wheel_angle", "time")}
        data["steering"] = np.array(steering)
        climbed = 0
        for t in range(30, 90, 6):
            climbed = max(climbed, abs(float(env.elevation.grade_at(data["progress"][t]))))
            obs, info = env.reset(seed=4, options=logged_start(data, t))
            assert info["lateral_offset"] == pytest.approx(data["lateral_offset"][t], abs=1e-6)
            assert info["speed"] == pytest.approx(data["speed"][t], abs=1e-3)
            np.testing.assert_array_equal(obs["image"], frames[t], err_msg=f"step {t}")
        assert climbed > 0.03  # on the hill
    finally:
        env.close()


def _graded_episode(condition: str = "rural-hills", seed: int = 5) -> tuple:
    env = _env(condition)
    try:
        obs, info = env.reset(seed=seed)
        frames, poses = [obs["image"].copy()], []
        for _ in range(60):
            obs, _, _, _, info = env.step(np.array([info["expert_steering"]], np.float32))
            frames.append(obs["image"].copy())
            poses.append((info["x"], info["y"], info["yaw"], info["lateral_offset"], info["speed"]))
        return np.stack(frames), poses
    finally:
        env.close()


def test_graded_episodes_are_bit_identical_in_another_process_and_after_other_roads():
    import multiprocessing

    frames, poses = _graded_episode()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child_frames, child_poses = pool.apply(_graded_episode)
    assert np.array_equal(frames, child_frames) and poses == child_poses
    env = _env("rural-hills")
    try:  # a world that showed a level road and another graded one first
        env.reset(seed=1, options={"condition": "rural"})
        env.reset(seed=1, options={"condition": "mountain-fog", "track": split_seed("test", 4)})
        obs, info = env.reset(seed=5)
        again = [obs["image"].copy()]
        for _ in range(60):
            obs, _, _, _, info = env.step(np.array([info["expert_steering"]], np.float32))
            again.append(obs["image"].copy())
    finally:
        env.close()
    assert np.array_equal(frames, np.stack(again))


def test_a_copy_continues_bit_identically_on_a_hill():
    env = _env("rural-hills")
    try:
        env.reset(seed=2)
        for _ in range(220):
            env.step(np.array([env.expert_command()], np.float32))
        assert abs(float(env.elevation.grade_at(env.s))) > 0.02  # on the hill
        twins = [copy.deepcopy(env), pickle.loads(pickle.dumps(env))]
        runs = []
        for e in [env, *twins]:
            run = []
            for _ in range(20):
                obs, _, _, _, info = e.step(np.array([0.05], np.float32))
                run.append((obs["image"].copy(), info["lateral_offset"], info["speed"]))
            runs.append(run)
        for twin in twins:
            twin.close()
    finally:
        env.close()
    for other in runs[1:]:
        assert all(np.array_equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(runs[0], other))


@pytest.mark.slow  # ~5 s of worker start-up; the graded episode's bit-identity in another process is in the default suite
def test_recording_under_rural_hills_gives_the_same_bytes_on_one_and_two_workers(tmp_path):
    from steerloop.driving_log import episode_file
    from steerloop.training.record import RecordConfig, record

    for workers in (1, 2):
        record(RecordConfig(out=str(tmp_path / f"w{workers}"), episodes=2, resolution=TINY, track_length=60.0,
                            conditions=("rural-hills",), workers=workers), progress=False)
    for index in range(2):
        name = episode_file(index)
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_oncoming_and_lead_cars_ride_on_the_graded_road():
    content = {"scenery": {"busy-hills": {"base": "mountain", "traffic": 40.0, "lead_gap": 12.0}}}
    env = LaneKeepEnv(track=HILLY, track_length=ROUTE, resolution=TINY, condition="busy-hills.noon",
                      condition_file=content)
    try:
        _, info = env.reset(seed=0)
        checked = 0
        for _ in range(80):
            _, _, _, _, info = env.step(np.array([info["expert_steering"]], np.float32))
            for body in env.traffic_bodies.ids:
                (x, y, z), _ = env.client.getBasePositionAndOrientation(body)
                if z < -50:  # waiting under the ground
                    continue
                lane = env.track.lane_state(x, y, 0.0)
                if 0.0 < lane.s < env.track.length:
                    t = env.elevation.banked_offset(lane.s, lane.offset)
                    assert z == pytest.approx(float(env.elevation.surface(lane.s, t)[2]), abs=0.01)
                    checked += 1
    finally:
        env.close()
    assert checked > 100


@pytest.mark.slow  # the level-road version runs in the default suite (tests/sim/test_memory.py)
def test_graded_road_meshes_leave_no_python_objects_behind():
    """As level roads (tests/sim/test_memory.py): the terrain goes through the reused holders and
    the road cache keeps no Elevation (nor its track) per road."""
    import gc
    import tracemalloc

    import pybullet
    from pybullet_utils import bullet_client

    client = bullet_client.BulletClient(connection_mode=pybullet.DIRECT)
    tracks = [generate_track(split_seed("train", i), length=400.0) for i in range(4)]
    try:
        for condition in ("rural-hills", "mountain-fog"):  # the holders grow to the largest mesh first
            scene.build_road_shapes(client, generate_track(split_seed("train", 99), length=1000.0), condition)
        gc.collect()
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        for track in tracks:
            for condition in ("rural-hills", "mountain-fog"):
                scene.build_road_shapes(client, track, condition)
        gc.collect()
        growth_kb = (tracemalloc.get_traced_memory()[0] - start) / 1024
    finally:
        tracemalloc.stop()
        client.disconnect()
    assert growth_kb < 10.0, f"8 graded roads left {growth_kb:.0f} KB of Python objects behind"


@pytest.mark.slow
def test_a_thousand_new_hill_tracks_grow_rss_by_at_most_50_mb():
    pytest.importorskip("psutil")  # the soak reads RSS through it
    from steerloop.evaluation.bench import SOAK_ALLOWED_GROWTH_MB, bench_soak

    result = bench_soak(tracks=1000, resolution=TINY, condition="rural-hills")
    assert result["rss_growth_mb"] <= SOAK_ALLOWED_GROWTH_MB, result
