"""Naming a policy: one string (a *policy spec*) for steerloop's own policies and users' code.

A spec is one of

- ``expert``, ``expert:LAW`` (``stanley``, ``pure_pursuit``), ``zeros``: built in;
- a steerloop checkpoint directory, or a stable-baselines3 model ``.zip``;
- ``package.module:attr``: an importable module (the current directory is tried too) and
  an attribute of it;
- ``path/to/file.py:attr``: a Python file that is not an installed module.

``attr`` (dotted for nested attributes) is a policy instance, a policy class, or a
factory; a class or factory is called with the keyword arguments given as
``--policy-kwargs JSON`` (``kwargs = {...}`` in a study file). The result must satisfy
:class:`steerloop.agents.protocol.Policy`.

A user's policy is trusted code: naming it runs it in this process (and in every worker
process), as a pytest plugin does. Data files (checkpoints, logs, results) are never
executed or unpickled.

:class:`PolicyRef` carries a policy to worker processes: a spec is re-created in every
worker; an object is pickled, when it can be (otherwise the call fails at once, naming
the spec form). :func:`policy_fingerprint` is the cache key of a policy (see
docs/policies.md for the rule).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerloop.agents.protocol import (Policy, PolicyError, check_policy, describe_policy, missing_methods,
                                       policy_capabilities)

BUILTIN_POLICIES = ("expert", "expert:stanley", "expert:pure_pursuit", "zeros")
SPEC_FORMS = ("expert, expert:LAW, zeros, a checkpoint directory, a stable-baselines3 .zip, "
              "package.module:attr or path/to/file.py:attr")
FILE_MODULE_PREFIX = "steerloop_user_file_"  # modules loaded from file.py:attr specs live under this name
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
MODULE_SPEC = re.compile(rf"^(?P<module>{_DOTTED}):(?P<attr>{_DOTTED})$")
FILE_SPEC = re.compile(rf"^(?P<file>.+\.py):(?P<attr>{_DOTTED})$")


def spec_kind(spec: str) -> str:
    """``builtin``, ``sb3``, ``checkpoint``, ``file`` or ``module``; a :class:`PolicyError` for
    a string that names no policy."""
    if spec in ("expert", "zeros") or spec.startswith("expert:"):
        return "builtin"
    if spec.endswith(".zip"):
        return "sb3"
    if FILE_SPEC.match(spec):
        return "file"
    if os.path.exists(spec):
        return "checkpoint"
    if MODULE_SPEC.match(spec):
        return "module"
    raise PolicyError(f"unknown policy {spec!r}: use {SPEC_FORMS} (a path that does not exist was given)")


def parse_kwargs(text: str | None, where: str = "--policy-kwargs") -> dict:
    """Keyword arguments from a JSON object (None or "" -> {})."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise PolicyError(f"{where}: not valid JSON ({error}); give an object like '{{\"weights\": \"w.pt\"}}'") \
            from None
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be a JSON object of keyword arguments, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- loading user code
def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def file_module_name(path: Path) -> str:
    """The (stable, per absolute path) module name a ``file.py:attr`` spec's file is loaded as."""
    stem = re.sub(r"\W", "_", path.stem)
    return f"{FILE_MODULE_PREFIX}{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


def _import_file(spec: str, file: str):
    path = Path(file).resolve()
    if not path.is_file():
        raise PolicyError(f"policy {spec!r}: {path} does not exist")
    name = file_module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # as import does: the module's classes pickle and dataclasses work
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - the user's file failed to run: one named line
        del sys.modules[name]
        raise PolicyError(f"policy {spec!r}: running {path} raised {_one_line(error)}") from None
    return module


def _import_module(spec: str, name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        cwd = os.getcwd()
        missing = error.name or ""
        if cwd in sys.path or not (name == missing or name.startswith(missing + ".")):
            raise PolicyError(f"policy {spec!r}: cannot import module {name}: {_one_line(error)}") from None
        sys.path.append(cwd)  # like `python -m`: a module in the current directory can be named
        return _import_module(spec, name)
    except Exception as error:  # noqa: BLE001 - the user's module failed to import: one named line
        raise PolicyError(f"policy {spec!r}: importing module {name} raised {_one_line(error)}") from None


def _attribute(spec: str, module, attr: str, label: str):
    """``module.attr`` (dotted); ``label`` names the module in errors."""
    obj, owner = module, label
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PolicyError(f"policy {spec!r}: {owner} has no attribute {part!r}") from None
        owner = f"{owner}.{part}" if owner != label else part
    return obj


def _instantiate(spec: str, attr: str, obj, kwargs: dict):
    if not isinstance(obj, type) and not missing_methods(obj):  # an instance
        if kwargs:
            raise PolicyError(f"policy {spec!r}: {attr} is a policy instance; keyword arguments "
                              f"({', '.join(sorted(kwargs))}) apply only to a class or a factory")
        return obj
    if not callable(obj):
        raise PolicyError(f"policy {spec!r}: {attr} is a {type(obj).__name__}, not a policy instance, class or "
                          "factory")
    try:
        return obj(**kwargs)
    except Exception as error:  # noqa: BLE001 - the user's factory failed: one named line
        raise PolicyError(f"policy {spec!r}: calling {attr}({', '.join(f'{k}=...' for k in sorted(kwargs))}) "
                          f"raised {_one_line(error)}") from None


def _load_user(spec: str, kind: str, kwargs: dict) -> Policy:
    if kind == "file":
        match = FILE_SPEC.match(spec)
        module, label = _import_file(spec, match["file"]), match["file"]
    else:
        match = MODULE_SPEC.match(spec)
        module, label = _import_module(spec, match["module"]), f"module {match['module']}"
    policy = _instantiate(spec, match["attr"], _attribute(spec, module, match["attr"], label), kwargs)
    return check_policy(policy, spec)


def _load_builtin(spec: str, kind: str) -> Policy:
    if kind == "builtin":
        from steerloop.agents.baselines import ZerosPolicy
        from steerloop.agents.experts import ExpertPolicy

        if spec == "zeros":
            return ZerosPolicy()
        return ExpertPolicy(spec.split(":", 1)[1]) if ":" in spec else ExpertPolicy()
    if kind == "sb3":
        from steerloop.agents.sb3 import SB3Policy

        return SB3Policy(spec)
    from steerloop.agents.checkpoint import load_policy_from_checkpoint

    return load_policy_from_checkpoint(spec)


def load_policy(policy: str | os.PathLike | Policy, kwargs: dict | None = None) -> Policy:
    """The policy a spec names (see the module docstring), with ``kwargs`` for a user's
    class or factory; a policy object is checked against the protocol and returned as is."""
    kwargs = dict(kwargs or {})
    if not isinstance(policy, (str, os.PathLike)):
        if kwargs:
            raise PolicyError("keyword arguments apply only to a policy named by a spec string, not to an object")
        return check_policy(policy, type(policy).__qualname__)
    spec = os.fspath(policy)
    kind = spec_kind(spec)
    if kind in ("file", "module"):
        return _load_user(spec, kind, kwargs)
    if kwargs:
        raise PolicyError(f"policy {spec!r}: keyword arguments (--policy-kwargs) apply only to "
                          "package.module:attr and file.py:attr policies")
    return _load_builtin(spec, kind)


# ----------------------------------------------------------------------------- worker transport
class _ModuleRecorder(pickle.Pickler):
    """A pickler that notes the module of every object and class it pickles."""

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.modules: set[str] = set()

    def persistent_id(self, obj):
        owner = obj if isinstance(obj, type) or inspect.isroutine(obj) else type(obj)
        self.modules.add(getattr(owner, "__module__", None) or "")
        return None


def _unimportable(module: str) -> bool:
    if module.startswith(FILE_MODULE_PREFIX):
        return True
    return module == "__main__" and not getattr(sys.modules.get("__main__"), "__file__", None)


def check_picklable(policy, name: str) -> None:
    """A :class:`PolicyError` unless ``policy`` can be pickled to worker processes (and its
    classes imported there by name)."""
    recorder = _ModuleRecorder(io.BytesIO())
    try:
        recorder.dump(policy)
    except Exception as error:  # noqa: BLE001 - any pickling failure has the same fix
        reason = _one_line(error)
    else:
        bad = sorted(m for m in recorder.modules if _unimportable(m))
        if not bad:
            return
        reason = f"its code is in {bad[0]}, which worker processes cannot import by name"
    raise PolicyError(f"policy {name!r} cannot be sent to worker processes ({reason}); name it by its spec, "
                      "package.module:attr or path/to/file.py:attr, so every worker re-creates it, or use one worker")


@dataclass(frozen=True)
class PolicyRef:
    """A policy as given to an evaluation: a spec (+ kwargs), or an object; ``name`` is what
    results call it. Picklable to workers (:meth:`for_workers`), which :meth:`load` it."""

    name: str
    spec: str | None = None
    """The spec, its file path made absolute (workers may run elsewhere); None for an object."""
    kwargs: dict = field(default_factory=dict)
    obj: Any = None

    def load(self) -> Policy:
        return self.obj if self.spec is None else load_policy(self.spec, self.kwargs)

    @property
    def is_user_code(self) -> bool:
        return self.spec is None or spec_kind(self.spec) in ("file", "module")

    def for_workers(self) -> PolicyRef:
        """This reference, checked to reach worker processes (an object must pickle)."""
        if self.spec is None:
            check_picklable(self.obj, self.name)
        return self


def policy_ref(policy: str | os.PathLike | Policy, kwargs: dict | None = None, name: str | None = None) -> PolicyRef:
    """A :class:`PolicyRef` for a spec (with ``kwargs``) or a policy object (checked against
    the protocol). ``name`` (what results call it) defaults to the spec, or to the object's
    class name."""
    kwargs = dict(kwargs or {})
    if isinstance(policy, (str, os.PathLike)):
        spec = os.fspath(policy)
        loadable = spec
        match = FILE_SPEC.match(spec)
        if match and spec_kind(spec) == "file":
            loadable = f"{Path(match['file']).resolve()}:{match['attr']}"
        return PolicyRef(name=name or spec, spec=loadable, kwargs=kwargs)
    if kwargs:
        raise PolicyError("keyword arguments apply only to a policy named by a spec string, not to an object")
    name = name or type(policy).__qualname__
    return PolicyRef(name=name, obj=check_policy(policy, name))


# ----------------------------------------------------------------------------- cache keys
def hash_files(root: Path, files) -> str:
    """sha256 over (path relative to ``root``, content hash) of ``files``, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _content(path: Path) -> str:
    if path.is_file():
        return hash_files(path.parent, [path])
    return hash_files(path, [p for p in path.rglob("*") if p.is_file()])


def _named_paths(value) -> list[Path]:
    """Existing files and directories named by the strings anywhere in ``value`` (kwargs)."""
    if isinstance(value, str):
        return [Path(value)] if value and os.path.exists(value) else []
    if isinstance(value, dict):
        return [p for v in value.values() for p in _named_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _named_paths(v)]
    return []


def _source_file(obj) -> Path | None:
    module = inspect.getmodule(obj)
    path = getattr(module, "__file__", None)
    return Path(path) if path and os.path.isfile(path) else None


def user_code_files(ref: PolicyRef, policy: Policy) -> list[Path]:
    """The files a user policy's cache key hashes: the spec's module (or the object's class's
    module) source file, and every file or directory the spec's kwargs name."""
    files = []
    if ref.spec is not None:
        match = FILE_SPEC.match(ref.spec)
        if match and spec_kind(ref.spec) == "file":
            files.append(Path(match["file"]))
        else:
            source = _source_file(sys.modules.get(MODULE_SPEC.match(ref.spec)["module"]))
            files += [source] if source else []
    else:
        source = _source_file(type(policy))
        files += [source] if source else []
    return files + _named_paths(ref.kwargs)


def policy_fingerprint(ref: PolicyRef | str, policy: Policy | None = None) -> str:
    """The cache key of a policy: a built-in is its name (its code is steerloop's); a
    checkpoint or ``.zip``, its content; a user policy, its ``cache_key()`` when it has one,
    else a hash of the contents of :func:`user_code_files`, its kwargs and its ``describe()``.
    ``policy`` is the loaded policy (loaded here if needed)."""
    ref = ref if isinstance(ref, PolicyRef) else policy_ref(ref)
    if not ref.is_user_code:
        kind = spec_kind(ref.spec)
        return ref.spec if kind == "builtin" else _content(Path(ref.spec))
    policy = policy if policy is not None else ref.load()
    cache_key = policy_capabilities(policy).cache_key
    kwargs = json.dumps(ref.kwargs, sort_keys=True, default=str)
    if cache_key is not None:
        try:
            key = cache_key()
        except Exception as error:  # noqa: BLE001 - user code
            raise PolicyError(f"policy {ref.name!r}: cache_key() raised {_one_line(error)}") from None
        return hashlib.sha256(f"cache_key\0{key}\0{kwargs}".encode()).hexdigest()
    files = user_code_files(ref, policy)
    if not files:
        raise PolicyError(f"policy {ref.name!r}: its code has no source file to hash for the cache; give it a "
                          "cache_key() method, or evaluate without the cache (--no-cache)")
    description = json.dumps(describe_policy(policy, ref.name), sort_keys=True, default=str)
    digest = hashlib.sha256(f"source\0{kwargs}\0{description}".encode())
    for path in files:
        digest.update(str(path.resolve()).encode() + b"\0" + _content(path).encode())
    return digest.hexdigest()
