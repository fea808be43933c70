"""The policy contract: what any steering policy, steerloop's or a user's, implements.

A policy is any object with

- ``predict(observation, state=None, episode_start=None, deterministic=True) -> (actions, state)``:
  ``observation`` is the environment's observation dict with a leading batch axis
  (``image`` (N, H, W, 3) uint8, ``speed`` (N, 1) float32, and ``privileged`` (N, F) for
  policies that ask for it); ``actions`` is a float numpy array (N, 1) (or (N,)) of
  normalised steering in [-1, 1]; ``state`` is the recurrent state carried to the next
  call (None for stateless policies); ``episode_start`` (N,) bool marks the environments
  whose episode starts at this step;
- ``reset()``: called before every batch of episodes.

This is the stable-baselines3 ``predict`` contract, so SB3 models satisfy it as they are.
Optional capabilities, each with a default (:class:`PolicyBase` supplies them; for any
other object :func:`policy_capabilities` resolves them):

- ``requires_privileged`` (False): the policy reads ``observation["privileged"]``, the true
  lane features (the experts do); such a policy cannot be replayed on logged frames;
- ``recurrent`` (False): the policy carries memory in ``state``;
- ``initial_state(n)`` (None): the episode-start state of ``n`` environments;
- ``select_state(state, keep)`` (absent): the state of the environments where ``keep``
  ((N,) bool) is true, so a batched rollout can stop calling the policy for finished
  environments; without it, finished environments keep being fed their last observation;
- ``describe() -> dict`` (``{"kind": "user", "class": ...}``): what goes into results.json;
- ``image_size`` (None): the camera (H, W) [px] the policy expects; evaluation refuses
  another resolution;
- ``cache_key() -> str`` (absent): a key that changes whenever the policy's code or weights
  change; the regression gate, the pytest fixture and the study reuse cached results only
  while it is unchanged (without it steerloop hashes the defining module's source and the
  files the spec's keyword arguments name; see docs/policies.md).

Consumers (the runner, rollouts, offline replay, the DAgger mixture, the command line)
read the capabilities through :func:`policy_capabilities` and call ``predict`` through
:func:`checked_predict`, which turns a wrong shape or dtype, NaN, or an exception into one
:class:`PolicyError` line naming the policy and where it happened.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from steerloop.errors import SteerloopError

REQUIRED_METHODS = ("predict", "reset")


class PolicyError(SteerloopError):
    """A policy cannot be loaded, or misbehaved; the one-line message names the policy (and
    the scenario or episode it was driving)."""


class ActionError(ValueError):
    """``predict`` returned something that is not a batch of finite steering commands."""

    def __init__(self, detail: str, row: int | None = None):
        super().__init__(detail)
        self.detail = detail
        self.row = row


@runtime_checkable
class Policy(Protocol):
    """The policy contract (see the module docstring). ``isinstance(obj, Policy)`` checks
    the required methods only; the optional capabilities have defaults."""

    @abstractmethod
    def predict(self, observation: dict, state: Any = None, episode_start: np.ndarray | None = None,
                deterministic: bool = True) -> tuple[np.ndarray, Any]:
        """(actions (N, 1) float, next state) for a batch of N observations."""

    def reset(self) -> None:
        """Forget anything kept between episodes (called before every batch of episodes)."""


class PolicyBase(Policy):
    """A base class for policies: subclass it and implement ``predict``; every optional
    capability has its default here (override what applies)."""

    requires_privileged: bool = False
    """True if ``predict`` reads ``observation["privileged"]`` (the true lane features)."""
    recurrent: bool = False
    """True if the policy carries memory in ``state``."""
    image_size: tuple[int, int] | None = None
    """The camera (H, W) [px] the policy expects, or None for any."""

    def reset(self) -> None:
        """Stateless by default."""

    def initial_state(self, n_envs: int) -> Any:
        """The episode-start state of ``n_envs`` environments (None: no state)."""
        return None

    def describe(self) -> dict:
        """What goes into results.json beside the policy's name."""
        return default_describe(self)


def default_describe(policy) -> dict:
    """``{"kind": "user", "class": ClassName}``: the description of a policy without ``describe``."""
    return {"kind": "user", "class": type(policy).__qualname__}


@dataclass(frozen=True)
class PolicyCapabilities:
    """A policy's optional capabilities, defaults filled in (see the module docstring)."""

    requires_privileged: bool
    recurrent: bool
    image_size: tuple[int, int] | None
    initial_state: Callable[[int], Any]
    select_state: Callable[[Any, np.ndarray], Any] | None
    """None when the policy cannot drop environments from its state."""
    describe: Callable[[], dict]
    cache_key: Callable[[], str] | None
    """None when the policy has no ``cache_key`` (steerloop then hashes its source)."""


def _no_state(n_envs: int) -> None:
    return None


def missing_methods(obj) -> list[str]:
    """The required methods ``obj`` lacks (empty when it satisfies :class:`Policy`)."""
    return [name for name in REQUIRED_METHODS if not callable(getattr(obj, name, None))]


def check_policy(obj, name: str) -> Policy:
    """``obj`` if it satisfies the protocol, else a :class:`PolicyError` naming what is missing."""
    missing = missing_methods(obj)
    if missing:
        raise PolicyError(f"policy {name!r}: {type(obj).__qualname__} does not satisfy the steerloop policy "
                          f"protocol: it has no {' and no '.join(f'{m}()' for m in missing)} method "
                          "(see steerloop.Policy)")
    return obj


def policy_capabilities(policy) -> PolicyCapabilities:
    """Every optional capability of ``policy``, with its default where the policy has none.
    The one place where steerloop looks at what a policy provides."""
    image_size = getattr(policy, "image_size", None)
    describe = getattr(policy, "describe", None)
    return PolicyCapabilities(
        requires_privileged=bool(getattr(policy, "requires_privileged", False)),
        recurrent=bool(getattr(policy, "recurrent", False)),
        image_size=None if image_size is None else (int(image_size[0]), int(image_size[1])),
        initial_state=getattr(policy, "initial_state", _no_state),
        select_state=getattr(policy, "select_state", None),
        describe=describe if callable(describe) else (lambda: default_describe(policy)),
        cache_key=getattr(policy, "cache_key", None),
    )


# ----------------------------------------------------------------------------- checked calls
def check_actions(actions, n: int) -> np.ndarray:
    """``actions`` as float32 (n, 1), or :class:`ActionError` if they are not a numpy float
    array of shape (n, 1) or (n,) with finite values."""
    if not isinstance(actions, np.ndarray):
        hint = " (convert a torch tensor with .detach().cpu().numpy())" if type(actions).__module__ == "torch" else ""
        raise ActionError(f"predict returned actions of type {type(actions).__name__}; expected a numpy array "
                          f"of shape ({n}, 1){hint}")
    if actions.shape not in ((n, 1), (n,)):
        raise ActionError(f"predict returned actions of shape {actions.shape}; expected ({n}, 1) (one steering "
                          f"command per environment of the batch)")
    if not np.issubdtype(actions.dtype, np.floating):
        raise ActionError(f"predict returned actions of dtype {actions.dtype}; expected float32 (normalised "
                          "steering in [-1, 1])")
    finite = np.isfinite(actions.reshape(n))
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ActionError(f"predict returned a non-finite steering command ({actions.reshape(n)[row]}) for "
                          f"environment {row} of the batch", row)
    return actions.astype(np.float32, copy=False).reshape(n, 1)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def checked_predict(policy, observation: dict, state, episode_start, *, name: str,
                    where: Sequence[str]) -> tuple[np.ndarray, Any]:
    """``policy.predict`` on a batch of ``len(where)`` observations (deterministic), its
    actions checked by :func:`check_actions`. ``where`` labels each row (a scenario or an
    episode); any failure is a one-line :class:`PolicyError` naming the policy and the row."""
    n = len(where)

    def fail(detail: str, row: int | None = None) -> PolicyError:
        place = where[row] if row is not None else ", ".join(dict.fromkeys(where))
        return PolicyError(f"policy {name!r} on {place}: {detail}")

    try:
        result = policy.predict(observation, state=state, episode_start=episode_start, deterministic=True)
    except PolicyError:
        raise
    except ActionError as error:  # a wrapped policy (the DAgger mixture's learner) misbehaved
        raise fail(error.detail, error.row) from None
    except Exception as error:  # noqa: BLE001 - any failure of user code becomes one named line
        raise fail(f"predict raised {_one_line(error)}") from None
    if not isinstance(result, tuple) or len(result) != 2:
        raise fail(f"predict must return (actions, state), got {type(result).__name__}")
    try:
        return check_actions(result[0], n), result[1]
    except ActionError as error:
        raise fail(error.detail, error.row) from None


def describe_policy(policy, name: str) -> dict:
    """``policy``'s description for results.json (its ``describe()`` or the default), checked
    to be a dict; a failure is a :class:`PolicyError` naming the policy."""
    try:
        description = policy_capabilities(policy).describe()
    except Exception as error:  # noqa: BLE001 - user code
        raise PolicyError(f"policy {name!r}: describe() raised {_one_line(error)}") from None
    if not isinstance(description, dict):
        raise PolicyError(f"policy {name!r}: describe() must return a dict, got {type(description).__name__}")
    return description
