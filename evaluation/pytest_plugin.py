"""steerloop's pytest plugin (registered through the ``pytest11`` entry point ``steerloop``).

It lets users test their own policies in their own repositories::

    def test_new_model_still_drives(steerloop_evaluate):
        result = steerloop_evaluate("runs/pilotnet/best", "smoke")
        assert result.success_rate >= 0.95

``steerloop_evaluate(policy, suite="test", *, resolution=(66, 200), policy_kwargs=None,
name=None)`` evaluates a policy once per session for each (policy, suite, resolution) and
returns an :class:`evaluation.regress.EvaluationResult`. ``policy`` is any policy spec
(``expert``, ``zeros``, a checkpoint directory, a ``.zip``, ``package.module:attr``,
``path/to/file.py:attr``, with ``policy_kwargs`` for a class or factory) or a policy object
(your own model, e.g. ``steerloop.ModelPolicy(net, ...)``). Results are kept in a directory
keyed by the policy's content (a user policy's ``cache_key()``, else its module's source
and the files its kwargs name), the suite and steerloop's source, so an unchanged policy is
not driven again in later sessions either. Options: ``--steerloop-out DIR`` (ini
``steerloop_out``; default ``$STEERLOOP_CACHE`` or ``~/.cache/steerloop``),
``--steerloop-workers N`` (ini ``steerloop_workers``; results do not depend on it) and
``--steerloop-no-cache`` (evaluate again, replacing cached results).

Nothing heavy is imported until the fixture is used: the plugin is loaded by every pytest
run in the environment.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("steerloop", "steerloop closed-loop policy evaluation")
    group.addoption("--steerloop-out", default=None, metavar="DIR",
                    help="directory for steerloop_evaluate results (default: $STEERLOOP_CACHE or "
                         "~/.cache/steerloop)")
    group.addoption("--steerloop-workers", type=int, default=None, metavar="N",
                    help="worker processes for steerloop_evaluate (default 1; results do not depend on it)")
    group.addoption("--steerloop-no-cache", action="store_true", default=False,
                    help="evaluate policies again instead of reusing cached steerloop_evaluate results")
    parser.addini("steerloop_out", "directory for steerloop_evaluate results", default="")
    parser.addini("steerloop_workers", "worker processes for steerloop_evaluate", default="1")


def _workers(config: pytest.Config) -> int:
    value = config.getoption("steerloop_workers")
    if value is None:
        text = config.getini("steerloop_workers")
        try:
            value = int(text)
        except ValueError:
            raise pytest.UsageError(f"ini option steerloop_workers must be an integer, got {text!r}") from None
    if value < 1:
        raise pytest.UsageError(f"--steerloop-workers must be >= 1, got {value}")
    return value


def _out(config: pytest.Config) -> Path | None:
    value = config.getoption("steerloop_out") or config.getini("steerloop_out")
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else config.rootpath / path


@pytest.fixture(scope="session")
def steerloop_evaluate(pytestconfig: pytest.Config):
    """``steerloop_evaluate(policy, suite="test", *, resolution=(66, 200), policy_kwargs=None,
    name=None)`` -> EvaluationResult (``.success_rate``, ``.mean_abs_offset_m``, ``.scenarios``,
    ``.failed_scenarios``, ...), evaluated once per session for each (policy, suite,
    resolution); ``policy`` is a policy spec or a policy object."""
    from steerloop.evaluation.regress import PolicyEvaluator, default_cache_dir

    return PolicyEvaluator(_out(pytestconfig) or default_cache_dir(), workers=_workers(pytestconfig),
                           no_cache=pytestconfig.getoption("steerloop_no_cache"))
