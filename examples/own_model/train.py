"""My own training loop on a steerloop driving log, read with plain h5py.

    python examples/own_model/train.py DATA_DIR OUT.safetensors [STEPS]
"""

import sys
from pathlib import Path

import h5py
import numpy as np
import torch
from safetensors.torch import save_file

from model import TinyNet, as_policy


def read_log(directory: str) -> tuple[np.ndarray, np.ndarray]:
    """Camera frames (N, H, W, 3) uint8 and the expert's steering (N,) of every episode."""
    frames, steering = [], []
    for path in sorted(Path(directory).glob("episode_*.h5")):
        with h5py.File(path, "r") as f:
            frames.append(f["frames/center"][:])
            steering.append(f["expert_steering"][:])
    return np.concatenate(frames), np.concatenate(steering).astype(np.float32)


def train(data: str, out: str, steps: int = 300, batch: int = 64, seed: int = 0) -> float:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    frames, steering = read_log(data)
    net = TinyNet()
    x = torch.from_numpy(as_policy(net).preprocess(frames))  # the same pixels the policy will see
    y = torch.from_numpy(steering)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        index = torch.from_numpy(rng.integers(0, len(x), batch))
        loss = torch.nn.functional.mse_loss(net(x[index]), y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    save_file(net.state_dict(), out)
    return loss.item()


if __name__ == "__main__":
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    print(f"final training loss {train(sys.argv[1], sys.argv[2], steps):.4f}")
