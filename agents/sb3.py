"""stable-baselines3 models (``.zip``) as steerloop policies.

SB3 models already implement the ``predict`` contract; this adapter loads one on the CPU
and adds the attributes steerloop's runner reads. Loading goes through SB3's own
``load``, which reads weights with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

ALGORITHMS = ("PPO", "A2C", "SAC", "TD3", "DDPG")


class SB3Policy:
    requires_privileged = False

    def __init__(self, path: str | Path):
        import stable_baselines3

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"stable-baselines3 model {path} does not exist")
        errors = []
        for name in ALGORITHMS:
            try:
                self.model = getattr(stable_baselines3, name).load(str(path), device="cpu")
                self.algorithm = name
                break
            except Exception as error:  # noqa: BLE001 - try the next algorithm, report all if none fits
                errors.append(f"{name}: {type(error).__name__}")
        else:
            raise ValueError(f"{path} is not a stable-baselines3 model any of {ALGORITHMS} can load ({errors})")
        self.path = str(path)
        self.recurrent = False

    def reset(self) -> None:
        """SB3 feed-forward policies keep no memory."""

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        return self.model.predict(observation, state=state, episode_start=episode_start, deterministic=deterministic)

    def describe(self) -> dict:
        return {"kind": "sb3", "algorithm": self.algorithm, "path": self.path}
