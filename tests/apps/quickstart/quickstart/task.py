"""Model, data and train/test loops, as in Flower's quickstart-pytorch (unaware of qfl)."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qfl.simulations.data import client_data
from qfl.simulations.partition import PartitionSpec


class Net(nn.Module):
    """A small CNN with a BatchNorm layer (its num_batches_tracked buffer is int64)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


#: Share of each client's samples held out for its evaluate function.
VAL_FRACTION = 0.2


def load_data(partition_id: int, num_partitions: int, batch_size: int, max_samples: int):
    """Train and test loaders of one partition (Fashion-MNIST from the local IDX files)."""
    d = client_data(
        PartitionSpec("iid", num_partitions), partition_id, max_samples=max_samples, val_fraction=VAL_FRACTION
    )
    train = DataLoader(TensorDataset(d.train_inputs, d.train_labels), batch_size=batch_size, shuffle=True)
    test = DataLoader(TensorDataset(d.val_inputs, d.val_labels), batch_size=batch_size)
    return train, test


def train(net, loader, epochs: int, lr: float) -> float:
    """Train, return the mean loss."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total, n = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
    return total / max(n, 1)


@torch.no_grad()
def test(net, loader) -> tuple[float, float]:
    """(loss, accuracy)."""
    net.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in loader:
        out = net(x)
        loss += nn.functional.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return loss / n, correct / n
