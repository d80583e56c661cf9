"""The demo networks and their (seconds-long, deterministic) training on synthetic data."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

FEATURES, CLASSES, IMAGE = 64, 10, (3, 64, 64)


class TabularMLP(nn.Module):
    """64 float32 features -> 256 -> 256 -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ImageCNN(nn.Module):
    """3x64x64 float32 images -> 10 logits: three conv blocks and a linear head."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, 16), block(16, 32), block(32, 64))
        self.head = nn.Linear(64 * 8 * 8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def tabular_data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features; the class is the argmax of a fixed random linear map."""
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(0).standard_normal((FEATURES, CLASSES)).astype(np.float32)
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    return x, (x @ teacher).argmax(axis=1)


def image_data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise plus a bright square whose position (one of 10) is the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, rows)
    x = (0.3 * rng.standard_normal((rows, *IMAGE))).astype(np.float32)
    for i, label in enumerate(y):
        r, c = divmod(int(label), 5)
        x[i, label % 3, 8 + 24 * r : 24 + 24 * r, 2 + 12 * c : 14 + 12 * c] += 1.0
    return x, y


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int, batch: int, seed: int) -> nn.Module:
    """A few hundred Adam steps; fixed seeds make the weights identical run to run (the initial weights
    too: the model was built before the seed was set, so they are drawn again here)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            module.reset_parameters()
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x), batch))
        optimizer.zero_grad()
        loss_fn(model(xt[idx]), yt[idx]).backward()
        optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
