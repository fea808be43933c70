"""The policy contract (agents.protocol), policy specs (agents.spec) and the ModelPolicy adapter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch

from steerloop.agents.adapter import ModelPolicy
from steerloop.agents.baselines import ZerosPolicy
from steerloop.agents.experts import ExpertPolicy, NoisyExpert
from steerloop.agents.mixture import MixturePolicy
from steerloop.agents.models import ModelConfig, build_model
from steerloop.agents.policy import LearnedPolicy
from steerloop.agents.preprocess import PreprocessConfig
from steerloop.agents.protocol import (ActionError, Policy, PolicyBase, PolicyError, check_actions, checked_predict,
                                       policy_capabilities)
from steerloop.agents.sb3 import SB3Policy
from steerloop.agents.spec import (check_picklable, load_policy, parse_kwargs, policy_fingerprint, policy_ref,
                                   spec_kind)

TINY = (16, 32)


def batch(n: int = 2) -> dict:
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 256, (n, *TINY, 3), dtype=np.uint8), "speed": np.full((n, 1), 10, np.float32)}


class Bare:
    """A policy with the required methods only."""

    def reset(self):
        pass

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        return np.zeros((len(observation["image"]), 1), np.float32), state


# ----------------------------------------------------------------------------- the protocol
@pytest.mark.parametrize("cls", [ZerosPolicy, ExpertPolicy, NoisyExpert, MixturePolicy, LearnedPolicy, SB3Policy])
def test_every_built_in_declares_the_protocol(cls):
    assert issubclass(cls, PolicyBase) and issubclass(cls, Policy)


def test_the_protocol_checks_the_required_methods_only():
    assert isinstance(Bare(), Policy)
    assert isinstance(ZerosPolicy(), Policy)
    assert not isinstance(object(), Policy)

    class NoReset:
        def predict(self, observation, state=None, episode_start=None, deterministic=True):
            return None

    assert not isinstance(NoReset(), Policy)


def test_capabilities_have_their_defaults_for_a_bare_policy():
    caps = policy_capabilities(Bare())
    assert (caps.requires_privileged, caps.recurrent, caps.image_size) == (False, False, None)
    assert caps.initial_state(3) is None and caps.select_state is None and caps.cache_key is None
    assert caps.describe() == {"kind": "user", "class": "Bare"}


def test_capabilities_of_built_ins():
    assert policy_capabilities(ExpertPolicy()).requires_privileged
    assert policy_capabilities(ExpertPolicy()).describe() == {"kind": "expert", "law": "stanley"}
    config = ModelConfig(arch="cnn-lstm", preprocess=PreprocessConfig(crop_top=4, resize=(12, 32)))
    caps = policy_capabilities(LearnedPolicy(build_model(config), config))
    assert caps.recurrent and caps.select_state is not None and len(caps.initial_state(2)) == 2


@pytest.mark.parametrize("actions, message", [
    (np.zeros((2, 2), np.float32), r"shape \(2, 2\); expected \(2, 1\)"),
    (np.zeros((3, 1), np.float32), r"shape \(3, 1\)"),
    (np.zeros((2, 1), np.int64), "dtype int64; expected float32"),
    (np.array([[0.1], [np.nan]], np.float32), r"non-finite steering command \(nan\) for environment 1"),
    ([[0.0], [0.0]], "of type list; expected a numpy array"),
    (torch.zeros(2, 1), r"type Tensor.*\.detach\(\)\.cpu\(\)\.numpy\(\)"),
])
def test_wrong_actions_are_refused(actions, message):
    with pytest.raises(ActionError, match=message):
        check_actions(actions, 2)


def test_actions_become_float32_n_by_1():
    out = check_actions(np.array([0.25, -0.5]), 2)
    assert out.dtype == np.float32 and out.shape == (2, 1) and out[1, 0] == -0.5


def test_checked_predict_names_the_policy_and_the_row():
    class Raises(Bare):
        def predict(self, observation, state=None, episode_start=None, deterministic=True):
            raise RuntimeError("weights on the\nwrong device")

    class NaN(Bare):
        def predict(self, observation, state=None, episode_start=None, deterministic=True):
            return np.array([[0.0], [np.nan]], np.float32), state

    class NoState(Bare):
        def predict(self, observation, state=None, episode_start=None, deterministic=True):
            return np.zeros((2, 1), np.float32)

    where = ["scenario a", "scenario b"]
    with pytest.raises(PolicyError) as error:
        checked_predict(Raises(), batch(), None, None, name="mine:p", where=where)
    assert str(error.value) == ("policy 'mine:p' on scenario a, scenario b: predict raised RuntimeError: weights on "
                                "the wrong device")
    with pytest.raises(PolicyError, match=r"^policy 'mine:p' on scenario b: predict returned a non-finite"):
        checked_predict(NaN(), batch(), None, None, name="mine:p", where=where)
    with pytest.raises(PolicyError, match=r"predict must return \(actions, state\), got ndarray"):
        checked_predict(NoState(), batch(), None, None, name="mine:p", where=where)


# ----------------------------------------------------------------------------- specs
USER_MODULE = '''
import numpy as np
from steerloop.agents.protocol import PolicyBase


class Constant(PolicyBase):
    def __init__(self, value=0.1):
        self.value = value

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        return np.full((len(observation["image"]), 1), self.value, np.float32), state

    def describe(self):
        return {"kind": "constant", "value": self.value}


def make(value=0.2):
    return Constant(value)


instance = Constant(0.3)
not_a_policy = 42


class NoPredict:
    def reset(self):
        pass
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_policies.py"
    path.write_text(USER_MODULE)
    return path


def _value(policy) -> float:
    return float(policy.predict(batch(1))[0][0, 0])


def test_a_file_spec_gives_an_instance_a_class_or_a_factory(user_file):
    assert _value(load_policy(f"{user_file}:instance")) == pytest.approx(0.3)
    assert _value(load_policy(f"{user_file}:Constant")) == pytest.approx(0.1)
    assert _value(load_policy(f"{user_file}:Constant", {"value": -0.4})) == pytest.approx(-0.4)
    assert _value(load_policy(f"{user_file}:make", {"value": 0.5})) == pytest.approx(0.5)
    assert spec_kind(f"{user_file}:make") == "file"


def test_a_module_spec_is_imported_from_the_current_directory(user_file, monkeypatch):
    monkeypatch.chdir(user_file.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(user_file.parent))])
    monkeypatch.delitem(sys.modules, "my_policies", raising=False)
    assert spec_kind("my_policies:make") == "module"
    assert _value(load_policy("my_policies:make", {"value": 0.7})) == pytest.approx(0.7)
    sys.modules.pop("my_policies", None)


@pytest.mark.parametrize("spec, kwargs, message", [
    ("{file}:missing", None, r"my_policies\.py.*has no attribute 'missing'"),
    ("{file}:not_a_policy", None, "is a int, not a policy instance, class or factory"),
    ("{file}:NoPredict", None, r"NoPredict does not satisfy the steerloop policy protocol: it has no predict\(\)"),
    ("{file}:instance", {"value": 1}, r"instance is a policy instance; keyword arguments \(value\) apply only"),
    ("{file}:make", {"speed": 1}, r"calling make\(speed=\.\.\.\) raised TypeError"),
    ("no_such_module_xyz:policy", None, "cannot import module no_such_module_xyz: ModuleNotFoundError"),
    ("{dir}/missing.py:policy", None, r"missing\.py does not exist"),
    ("expert", {"a": 1}, "keyword arguments .* apply only to package.module:attr and file.py:attr"),
    ("not-a-spec", None, "unknown policy 'not-a-spec': use expert"),
])
def test_bad_specs_are_one_line_errors_naming_the_policy(user_file, spec, kwargs, message):
    spec = spec.format(file=user_file, dir=user_file.parent)
    with pytest.raises(PolicyError, match=message) as error:
        load_policy(spec, kwargs)
    assert "\n" not in str(error.value) and spec in str(error.value)


def test_a_file_that_raises_on_import_names_the_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import numpy\nraise RuntimeError('no GPU here')\n")
    with pytest.raises(PolicyError, match=r"running .*broken\.py raised RuntimeError: no GPU here"):
        load_policy(f"{path}:policy")
    path.write_text("def policy(:\n")
    with pytest.raises(PolicyError, match="raised SyntaxError"):
        load_policy(f"{path}:policy")


def test_kwargs_json_must_be_an_object():
    assert parse_kwargs('{"weights": "w.pt"}') == {"weights": "w.pt"}
    assert parse_kwargs(None) == {}
    with pytest.raises(PolicyError, match="must be a JSON object"):
        parse_kwargs("[1, 2]")
    with pytest.raises(PolicyError, match="not valid JSON"):
        parse_kwargs("{weights: 1}")


def test_objects_from_a_file_cannot_be_pickled_to_workers_but_specs_and_importable_ones_can(user_file):
    with pytest.raises(PolicyError, match=r"cannot be sent to worker processes .* name it by its spec"):
        check_picklable(load_policy(f"{user_file}:instance"), "instance")
    policy_ref(f"{user_file}:make").for_workers()  # a spec: re-created in each worker
    check_picklable(ModelPolicy(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(1))), "seq")

    class Local(Bare):
        pass

    with pytest.raises(PolicyError, match="cannot be sent to worker processes"):
        check_picklable(Local(), "local")


def test_a_file_spec_is_resolved_for_workers_and_keeps_its_name(user_file, monkeypatch):
    monkeypatch.chdir(user_file.parent)
    ref = policy_ref("my_policies.py:make", {"value": 0.1})
    assert ref.name == "my_policies.py:make" and ref.spec == f"{user_file}:make"


def test_the_fingerprint_follows_the_code_and_the_kwargs_files(user_file, tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"1")
    spec = f"{user_file}:make"
    first = policy_fingerprint(spec)
    assert policy_fingerprint(spec) == first
    assert policy_fingerprint(policy_ref(spec, {"value": 0.5})) != first
    with_file = policy_fingerprint(policy_ref(f"{user_file}:Constant", {"value": str(weights)}))
    weights.write_bytes(b"2")
    assert policy_fingerprint(policy_ref(f"{user_file}:Constant", {"value": str(weights)})) != with_file
    user_file.write_text(USER_MODULE + "\n# edited\n")
    assert policy_fingerprint(spec) != first


def test_cache_key_replaces_the_source_hash(tmp_path):
    path = tmp_path / "keyed.py"
    path.write_text(USER_MODULE + "\nConstant.cache_key = lambda self: 'v1'\n")
    first = policy_fingerprint(f"{path}:make")
    other = tmp_path / "keyed_copy.py"
    other.write_text(USER_MODULE + "\n# different source, same key\nConstant.cache_key = lambda self: 'v1'\n")
    assert policy_fingerprint(f"{other}:make") == first


def test_built_in_fingerprints_are_unchanged():
    assert policy_fingerprint("expert") == "expert" and policy_fingerprint("zeros") == "zeros"


# ----------------------------------------------------------------------------- the adapter
def test_model_policy_preprocesses_as_named():
    seen = {}

    def model(x, speed):
        seen["x"], seen["speed"] = x, speed
        return x.mean(dim=(1, 2, 3)) * 0 + speed[:, 0] / 100

    policy = ModelPolicy(model, crop_top=4, resize=(8, 16), colour="yuv", mean=[0.5, 0.4, 0.3], std=0.25, speed=True)
    obs = batch(3)
    actions, state = policy.predict(obs)
    assert state is None and actions.shape == (3, 1) and np.allclose(actions, 0.1)
    frame = cv2.cvtColor(cv2.resize(obs["image"][1, 4:], (16, 8), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2YUV)
    expected = (frame.astype(np.float32) / 255 - np.array([0.5, 0.4, 0.3], np.float32)) / 0.25
    assert isinstance(seen["x"], torch.Tensor) and seen["x"].shape == (3, 3, 8, 16)
    np.testing.assert_allclose(seen["x"][1].numpy(), expected.transpose(2, 0, 1), atol=1e-6)
    assert seen["speed"].shape == (3, 1)


def test_model_policy_numpy_inputs_channels_last_and_gray():
    policy = ModelPolicy(lambda x: x[:, 0, 0, 0], colour="gray", channels="last", inputs="numpy", scale=1.0)
    obs = batch(2)
    actions, _ = policy.predict(obs)
    gray = cv2.cvtColor(obs["image"][0], cv2.COLOR_RGB2GRAY)
    assert actions[0, 0] == gray[0, 0]


def test_model_policy_cache_key_follows_the_weights_and_the_preprocessing():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1))
    key = ModelPolicy(net, resize=(8, 8)).cache_key()
    assert ModelPolicy(net, resize=(8, 8)).cache_key() == key
    assert ModelPolicy(net, resize=(8, 8), colour="yuv").cache_key() != key
    with torch.no_grad():
        net[1].bias += 1
    assert ModelPolicy(net, resize=(8, 8)).cache_key() != key
    described = ModelPolicy(net, resize=(8, 8)).describe()
    assert described["kind"] == "model" and described["class"] == "Sequential" and described["parameters"] == 193


def test_model_policy_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="colour must be one of"):
        ModelPolicy(lambda x: x, colour="cmyk")
    with pytest.raises(ValueError, match="crop_top must be an integer"):
        ModelPolicy(lambda x: x, crop_top=-1)


def test_import_steerloop_stays_light_and_exports_the_policy_api_lazily():
    code = textwrap.dedent("""
        import sys, steerloop
        assert "torch" not in sys.modules and "pybullet" not in sys.modules, "import steerloop must stay light"
        from steerloop import Policy, PolicyBase, ModelPolicy, load_policy, PolicyError
        print(Policy.__module__, ModelPolicy.__module__, load_policy.__module__)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["steerloop.agents.protocol", "steerloop.agents.adapter", "steerloop.agents.spec"]
