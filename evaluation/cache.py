"""The content-keyed evaluation cache of the regression gate and the pytest plugin: a policy
is evaluated once per (policy content, suite, resolution, steerloop source)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from steerloop.agents.spec import hash_files
from steerloop.evaluation.results import EvaluationResult
from steerloop.evaluation.runner import DEFAULT_BATCH, evaluate
from steerloop.evaluation.suites import Suite, load_suite
from steerloop.paths import path_under, slug


# ----------------------------------------------------------------------------- evaluation cache
def default_cache_dir() -> Path:
    """``$STEERLOOP_CACHE``, else ``$XDG_CACHE_HOME/steerloop``, else ``~/.cache/steerloop``."""
    if os.environ.get("STEERLOOP_CACHE"):
        return Path(os.environ["STEERLOOP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "steerloop"


SOURCE_PACKAGES = ("steerloop", "steerloop.driving_log", "steerloop.sim", "steerloop.agents", "steerloop.training",
                   "steerloop.evaluation")  # whose files make up code_fingerprint


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of steerloop's own source (every file of its packages, wherever the install put
    them): cached results are reused only by the code that produced them."""
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        (directory,) = importlib.util.find_spec(package).submodule_search_locations  # imports no subpackage
        directory = Path(directory)
        files = [p for p in directory.glob("*" if package == "steerloop" else "**/*")
                 if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
        digest.update(package.encode() + b"\0" + hash_files(directory, files).encode())
    return digest.hexdigest()


def policy_fingerprint(policy, kwargs: dict | None = None) -> str:
    """The cache key of a policy (a spec with ``kwargs``, or an object): the content of a
    checkpoint directory or ``.zip`` (so retrained weights at the same path are evaluated
    again); a built-in policy is its name (its code is in :func:`code_fingerprint`); a user
    policy, its ``cache_key()``, else a hash of its module's source and of the files its
    kwargs name (:func:`steerloop.agents.spec.policy_fingerprint`)."""
    from steerloop.agents.spec import policy_fingerprint as fingerprint
    from steerloop.agents.spec import policy_ref

    return fingerprint(policy_ref(policy, kwargs))


def _json_key(value) -> str:
    return json.dumps(value, sort_keys=True, default=list)


@dataclass
class PolicyEvaluator:
    """Evaluates policies on suites into ``root`` (one directory per policy content, suite,
    resolution and steerloop source) and remembers results for the life of the object, so
    each (policy, suite) is evaluated once; an unchanged policy is never re-driven."""

    root: Path = field(default_factory=default_cache_dir)
    workers: int = 1
    progress: bool = False
    plots: bool = False
    no_cache: bool = False
    """Evaluate again, replacing cached results (once per policy and suite for this object)."""
    _memory: dict = field(default_factory=dict, repr=False)

    def run_dir(self, policy, suite: Suite, resolution=(66, 200), *, policy_kwargs: dict | None = None,
                name: str | None = None) -> Path:
        """The results directory of ``policy`` (a spec or an object) on ``suite``: keyed by the
        policy's name and cache key (:func:`policy_fingerprint`), the suite, the resolution and
        steerloop's source."""
        from steerloop.agents.spec import policy_fingerprint as fingerprint
        from steerloop.agents.spec import policy_ref

        ref = policy_ref(policy, policy_kwargs, name)
        identity = {"policy": ref.name, "content": fingerprint(ref), "suite": suite.to_dict(),
                    "resolution": list(resolution), "batch": DEFAULT_BATCH, "code": code_fingerprint()}
        if ref.kwargs:
            identity["policy_kwargs"] = ref.kwargs
        key = hashlib.sha256(_json_key(identity).encode())
        # The policy (often a checkpoint path) is slugged for the directory name; results.json keeps it as given.
        return path_under(self.root, f"{slug(ref.name)}-{slug(suite.name, default='suite')}-{key.hexdigest()[:16]}")

    def __call__(self, policy, suite: str | os.PathLike | Suite = "test", *, resolution=(66, 200),
                 policy_kwargs: dict | None = None, name: str | None = None) -> EvaluationResult:
        """Evaluate ``policy`` on ``suite`` (a built-in name, a suite JSON file or a
        :class:`Suite`). ``policy`` is a policy spec (``expert``, ``zeros``, a checkpoint
        directory, a ``.zip``, ``package.module:attr``, ``path/to/file.py:attr``; a user's class
        or factory gets ``policy_kwargs``) or a policy object; ``name`` is what results call it."""
        policy = os.fspath(policy) if isinstance(policy, os.PathLike) else policy
        suite = suite if isinstance(suite, Suite) else load_suite(str(suite))
        resolution = tuple(int(v) for v in resolution)
        out = self.run_dir(policy, suite, resolution, policy_kwargs=policy_kwargs, name=name)
        memo = (out, id(policy) if not isinstance(policy, str) else policy)
        if memo not in self._memory:
            if self.no_cache and out.exists():
                shutil.rmtree(out)
            data = evaluate(policy, suite, out, policy_kwargs=policy_kwargs, name=name, workers=self.workers,
                            resolution=resolution, progress=self.progress, plots=self.plots)
            self._memory[memo] = EvaluationResult(json.loads(json.dumps(data)), out / "results.json")
        return self._memory[memo]


