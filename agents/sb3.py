"""stable-baselines3 models (``.zip``) as steerloop policies, loaded without running code from the file.

SB3 models already implement the ``predict`` contract; this adapter loads one on the CPU
and adds the attributes steerloop's runner reads. SB3's own ``load`` unpickles (cloudpickle)
every ``:serialized:`` entry of the zip's JSON ``data`` member, so a crafted zip runs
arbitrary code. :func:`safe_sb3_load` reads ``data`` as JSON itself and supplies every
serialised entry from known-good values through SB3's ``custom_objects`` (SB3 then skips
unpickling them), or refuses the file with a one-line message naming the entry. The
weights (``*.pth``) are read by SB3 with ``torch.load(weights_only=True)``. See
docs/security.md, "Loading stable-baselines3 models safely".
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections import deque
from pathlib import Path

import numpy as np

from steerloop.agents.protocol import PolicyBase

ALGORITHMS = ("PPO", "A2C", "SAC", "TD3", "DDPG")
CONTRIB_ALGORITHMS = ("RecurrentPPO",)
RL_INSTALL_HINT = 'pip install "steerloop[rl]"'
SERIALIZED = ":serialized:"  # SB3's marker of a cloudpickled entry in the zip's JSON data
STATS_WINDOW = 100  # [episodes] SB3's default length of the episode-info buffers

# Entries that only describe the last rollout (the environment is reset before training).
RESET_ON_LOAD = ("_last_obs", "_last_original_obs", "_last_episode_starts")
EPISODE_BUFFERS = ("ep_info_buffer", "ep_success_buffer")
SCHEDULES = ("lr_schedule", "clip_range", "clip_range_vf", "learning_rate")
BUFFER_CLASSES = ("rollout_buffer_class", "replay_buffer_class")
CLASS_KWARGS = ("activation_fn", "optimizer_class", "features_extractor_class")  # policy_kwargs holding classes

CONSTANT = re.compile(r"ConstantSchedule\(val=([^,()]+)\)")
LINEAR = re.compile(r"LinearSchedule\(start=([^,()]+), end=([^,()]+), end_fraction=([^,()]+)\)")
INIT_OWNER = re.compile(r"<function ([A-Za-z_][A-Za-z0-9_]*)\.__init__ at 0x[0-9a-fA-F]+>")
IMAGE_SHAPE = re.compile(r"'image': Box\(0, 255, \((\d+), (\d+), (\d+)\), uint8\)")
ATTRIBUTE_PATH = re.compile(r"(?!__)[A-Za-z_]\w*(\.(?!__)[A-Za-z_]\w*)*")  # e.g. policy.optimizer; no dunders


def _short(value, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_serialized(entry) -> bool:
    """Exactly SB3's test (``save_util.json_to_data``) for an entry it would unpickle."""
    return isinstance(entry, dict) and SERIALIZED in entry


def _refuse(path, key: str, why: str) -> ValueError:
    return ValueError(f"{path}: refusing to load this stable-baselines3 model: data entry {key!r} {why}; "
                      "stable-baselines3 would unpickle it, which can run code from the file")


def _read_data(raw: bytes, path) -> dict:
    """The zip's ``data`` member parsed as JSON, decoded exactly as SB3 decodes it."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            data = json.loads(archive.read("data").decode())
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a stable-baselines3 model zip ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a stable-baselines3 model zip (its data is not a JSON object)")
    return data


def _check_weight_names(raw: bytes, path) -> None:
    """SB3 loads each ``<name>.pth`` member into the model attribute at path ``name`` and
    sets each tensor of ``pytorch_variables.pth`` at its key: only plain attribute paths
    (no dunders such as ``__class__``) are accepted. Read with ``weights_only=True``."""
    import torch

    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        names = [os.path.splitext(name)[0] for name in archive.namelist() if os.path.splitext(name)[1] == ".pth"]
        variables = {}
        if "pytorch_variables.pth" in archive.namelist():
            try:
                with archive.open("pytorch_variables.pth") as member:
                    variables = torch.load(member, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - an unreadable member is a bad model file
                raise ValueError(f"{path}: refusing to load this stable-baselines3 model: pytorch_variables.pth is not "
                                 f"weights only ({type(error).__name__})") from None
    keys = list(variables) if isinstance(variables, dict) else [variables]
    for name in [n for n in names if n != "pytorch_variables"] + keys:
        if not isinstance(name, str) or not ATTRIBUTE_PATH.fullmatch(name):
            raise ValueError(f"{path}: refusing to load this stable-baselines3 model: weights named {_short(name)} "
                             "are not a plain model attribute path")


# ----------------------------------------------------------------------------- allow-lists
def _algorithms() -> dict[str, type]:
    """The algorithm classes steerloop loads: stable-baselines3's, and sb3-contrib's if installed."""
    import stable_baselines3

    algorithms = {name: getattr(stable_baselines3, name) for name in ALGORITHMS}
    try:
        import sb3_contrib
    except ImportError:
        return algorithms
    return {**algorithms, "RecurrentPPO": sb3_contrib.RecurrentPPO}


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _recorded_class(entry) -> str | None:
    """'module.Class' of a serialised class entry, from its readable fields: ``__module__``
    and the owner named in the ``__init__`` repr (SB3 writes both beside the pickle)."""
    if not _is_serialized(entry) or not isinstance(entry.get("__module__"), str):
        return None
    match = INIT_OWNER.fullmatch(str(entry.get("__init__", "")))
    return f"{entry['__module__']}.{match.group(1)}" if match else None


def _kwarg_classes() -> dict[str, type]:
    """Classes a policy_kwargs entry may name, keyed by ``str(cls)`` (how SB3 records them)."""
    import torch
    from stable_baselines3.common import torch_layers
    from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike

    nn, optim = torch.nn, torch.optim
    classes = (nn.ReLU, nn.Tanh, nn.ELU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Softplus,
               optim.Adam, optim.AdamW, optim.RMSprop, optim.SGD, RMSpropTFLike,
               torch_layers.NatureCNN, torch_layers.CombinedExtractor, torch_layers.FlattenExtractor)
    return {str(cls): cls for cls in classes}


def _buffer_classes() -> dict[str, type]:
    from stable_baselines3.common import buffers

    classes = (buffers.RolloutBuffer, buffers.DictRolloutBuffer, buffers.ReplayBuffer, buffers.DictReplayBuffer)
    return {_class_name(cls): cls for cls in classes}


# ----------------------------------------------------------------------------- known-good values
def lanekeep_observation_space(resolution: tuple[int, int], channels_first: bool = False):
    """The camera observation of steerloop/LaneKeep-v0 (as SB3 records it: channels first
    after its VecTransposeImage wrapper)."""
    from gymnasium import spaces

    from steerloop.sim.env import MAX_SPEED_OBS

    height, width = resolution
    shape = (3, height, width) if channels_first else (height, width, 3)
    return spaces.Dict({"image": spaces.Box(0, 255, shape, np.uint8),
                        "speed": spaces.Box(-5.0, MAX_SPEED_OBS, (1,), np.float32)})


def lanekeep_action_space():
    """The steering action of steerloop/LaneKeep-v0."""
    from gymnasium import spaces

    return spaces.Box(-1.0, 1.0, (1,), np.float32)


def _observation_space(path, entry):
    """The LaneKeep camera observation whose readable form equals the one recorded."""
    recorded = entry.get("spaces") if _is_serialized(entry) else None
    match = IMAGE_SHAPE.search(str(recorded))
    candidates = []
    if match:
        first, second, third = (int(v) for v in match.groups())
        candidates = [lanekeep_observation_space((second, third), channels_first=True),
                      lanekeep_observation_space((first, second))]
    for space in candidates:
        if entry.get(":type:") == str(type(space)) and recorded == str(space.spaces):
            return space
    raise _refuse(path, "observation_space", f"({_short(recorded)}) is not steerloop's LaneKeep camera "
                  "observation (image Box(0, 255, (H, W, 3) or (3, H, W), uint8) and speed)")


def _action_space(path, entry):
    """LaneKeep's steering Box, if the readable fields recorded are exactly its own."""
    space = lanekeep_action_space()
    expected = {":type:": str(type(space)), "dtype": str(space.dtype), "_shape": list(space.shape),
                "low": str(space.low), "high": str(space.high)}
    if _is_serialized(entry) and all(entry.get(k) == v for k, v in expected.items()):
        return space
    recorded = {k: entry.get(k) for k in expected} if isinstance(entry, dict) else entry
    raise _refuse(path, "action_space", f"({_short(recorded)}) is not LaneKeep's steering Box(-1, 1, (1,), float32)")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _schedule(entry, data: dict, key: str):
    """A schedule rebuilt from its readable form (constant or linear), or None if it cannot be."""
    from stable_baselines3.common.utils import ConstantSchedule, FloatSchedule, LinearSchedule

    text = str(entry.get("value_schedule", ""))
    if entry.get(":type:") == str(FloatSchedule):
        constant, linear = CONSTANT.fullmatch(text), LINEAR.fullmatch(text)
        values = [_number(v) for v in (constant or linear).groups()] if (constant or linear) else [None]
        if None not in values:
            return FloatSchedule(ConstantSchedule(*values) if constant else LinearSchedule(*values))
    rate = data.get("learning_rate")
    if key == "lr_schedule" and isinstance(rate, (int, float)) and not isinstance(rate, bool):
        return FloatSchedule(float(rate))  # SB3 rebuilds lr_schedule from learning_rate anyway
    return None


def _policy_kwargs(path, entry) -> dict:
    """policy_kwargs from its readable items, the classes among them taken from the allow-list."""
    if entry.get(":type:") != str(dict):
        raise _refuse(path, "policy_kwargs", f"is a pickled {_short(entry.get(':type:'))}, not a dict")
    allowed = _kwarg_classes()
    kwargs = {}
    for name, value in entry.items():
        if name in (":type:", SERIALIZED):
            continue
        if name in CLASS_KWARGS and isinstance(value, str) and value in allowed:
            value = allowed[value]
        elif isinstance(value, str) and value.startswith("<"):
            raise _refuse(path, f"policy_kwargs.{name}", f"holds {_short(value)}, which is not in steerloop's "
                          f"allow-list {sorted(cls.__name__ for cls in allowed.values())}")
        kwargs[name] = value
    return kwargs


def _supply(path, key: str, entry, data: dict, training: bool):
    """The known-good value of the serialised entry ``key``, or a refusal naming it."""
    if key in RESET_ON_LOAD:
        return None  # SB3 resets the environment before training when these are None
    if key in EPISODE_BUFFERS:
        window = data.get("_stats_window_size")
        return deque(maxlen=window if isinstance(window, int) and window > 0 else STATS_WINDOW)
    if key in SCHEDULES:
        schedule = _schedule(entry, data, key)
        if schedule is not None:
            return schedule
        if not training:
            from stable_baselines3.common.utils import FloatSchedule

            return FloatSchedule(0.0)  # only used by training, never by predict
        raise _refuse(path, key, f"is a {_short(entry.get(':type:'))} schedule whose value is not readable "
                      "(only constant and linear schedules of stable-baselines3 >= 2.7 are)")
    if key in BUFFER_CLASSES:
        allowed = _buffer_classes()
        recorded = _recorded_class(entry)
        if recorded in allowed:
            return allowed[recorded]
        raise _refuse(path, key, f"names {recorded or 'an unreadable class'}, not one of {sorted(allowed)}")
    if key == "policy_kwargs":
        return _policy_kwargs(path, entry)
    if not training and key in ("train_freq", "action_noise"):
        from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit

        return TrainFreq(1, TrainFrequencyUnit.STEP) if key == "train_freq" else None  # training-only
    raise _refuse(path, key, f"(a pickled {_short(entry.get(':type:'))}) is not one steerloop can supply "
                  "from known-good values")


def _policy_class(path, data: dict, algorithms: dict[str, type], algorithm: str | None) -> tuple[str, type]:
    """(algorithm name, policy class) from the allow-list: the policy classes of the algorithms'
    ``policy_aliases``, matched by the module and class name recorded in the JSON."""
    recorded = _recorded_class(data.get("policy_class"))
    if recorded and recorded.startswith("sb3_contrib.") and "RecurrentPPO" not in algorithms:
        raise ValueError(f"{path} is a RecurrentPPO model from sb3-contrib, which is not installed; "
                         f"install it with: {RL_INSTALL_HINT}")
    names = [algorithm] if algorithm is not None else list(algorithms)
    matches = [(name, cls) for name in names for cls in algorithms[name].policy_aliases.values()
               if _class_name(cls) == recorded]
    matches = [m for m in matches if m[0] != "PPO" or "clip_range" in data] or matches  # A2C saves no clip range
    if not matches:
        allowed = sorted({_class_name(c) for name in names for c in algorithms[name].policy_aliases.values()})
        raise _refuse(path, "policy_class", f"names {recorded or 'an unreadable class'}, not one of the "
                      f"{'/'.join(names)} policy classes {allowed}")
    return matches[0]


def safe_sb3_load(path: str | Path, algorithm: str | None = None, env=None, **kwargs):
    """Load a stable-baselines3 / sb3-contrib model zip without executing anything from it.

    Returns ``(model, algorithm name)``. ``algorithm`` (e.g. ``"PPO"``) restricts which
    algorithm may load it (default: the one whose policy classes include the recorded one);
    ``env`` and ``kwargs`` go to SB3's ``load`` (with ``env`` the model is loaded to train on,
    so training state that cannot be rebuilt is refused instead of replaced).

    SB3's ``load`` would cloudpickle-load every ``:serialized:`` entry of the zip's JSON
    ``data``; for keys present in ``custom_objects`` it uses the value given instead. So
    ``data`` is read here as JSON and every serialised entry is supplied: the spaces from
    steerloop's LaneKeep env (checked against the readable form recorded), the policy class
    from an allow-list, schedules rebuilt from their readable form, last-rollout state as
    None, or the file is refused with a ``ValueError`` naming the entry. The file is read
    once and SB3 gets those same bytes, so what was checked is what is loaded. Weights are
    read by SB3 with ``torch.load(weights_only=True)`` and must fit the supplied spaces
    (SB3 loads them with ``exact_match``). One function serves ``SB3Policy`` and
    ``train-rl`` resume so that every load goes through the same checks.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read stable-baselines3 model {path}: {error.strerror}") from None
    data = _read_data(raw, path)
    _check_weight_names(raw, path)
    algorithms = _algorithms()
    name, policy_class = _policy_class(path, data, algorithms, algorithm)
    training = env is not None
    custom = {"policy_class": policy_class,
              "observation_space": _observation_space(path, data.get("observation_space")),
              "action_space": _action_space(path, data.get("action_space"))}
    for key, entry in data.items():
        if key not in custom and _is_serialized(entry):
            custom[key] = _supply(path, key, entry, data, training)
    try:
        model = algorithms[name].load(io.BytesIO(raw), env=env, device="cpu", custom_objects=custom, **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure of SB3 on this file is a bad model file
        detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip())[:300]
        raise ValueError(f"{path}: stable-baselines3 could not load it as a {name} model on steerloop's LaneKeep "
                         f"spaces ({type(error).__name__}: {detail})") from None
    return model, name


class SB3Policy(PolicyBase):
    requires_privileged = False

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"stable-baselines3 model {path} does not exist")
        self.model, self.algorithm = safe_sb3_load(path)
        self.path = str(path)
        self.recurrent = self.algorithm in CONTRIB_ALGORITHMS
        self.image_size = self._image_size()

    def _image_size(self) -> tuple[int, int] | None:
        """(H, W) of the camera images the model was trained on, if its observation has an image."""
        space = self.model.observation_space
        image = space["image"] if hasattr(space, "spaces") and "image" in space.spaces else None
        if image is None or len(image.shape) != 3:
            return None
        shape = image.shape
        return (shape[1], shape[2]) if shape[0] == 3 else (shape[0], shape[1])  # channels first or last

    def reset(self) -> None:
        """No-op: a recurrent model's LSTM state travels in ``state`` (reset through ``episode_start``)."""

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        if self.image_size is not None and isinstance(observation, dict) and "image" in observation:
            got = tuple(np.shape(observation["image"])[-3:-1])
            if got != self.image_size:
                height, width = self.image_size
                raise ValueError(f"{self.path} was trained on {height}x{width} camera images, got "
                                 f"{got[0]}x{got[1]}: evaluate it with --resolution {height}x{width}")
        return self.model.predict(observation, state=state, episode_start=episode_start, deterministic=deterministic)

    def describe(self) -> dict:
        return {"kind": "sb3", "algorithm": self.algorithm, "path": self.path, "recurrent": self.recurrent}
