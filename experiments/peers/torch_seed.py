"""The seed MLP and seed CNN in PyTorch (CPU, eager), for experiments/benchmark.py.

    python torch_seed.py mlp|cnn EPOCHS BATCH_SIZE
"""

import sys
import time

import torch
from torch import nn

import common

torch.set_num_threads(torch.get_num_threads())
torch.manual_seed(0)
model_name, epochs, batch_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x, y, xt, yt = (torch.from_numpy(a) for a in common.load())

if model_name == "mlp":
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(300, 100), nn.ReLU(), nn.Dropout(0.2), nn.Linear(100, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
else:
    x, xt = x[:, None], xt[:, None]  # NCHW
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
                          nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.95, eps=1e-7)
loss_fn = nn.CrossEntropyLoss()
times, accuracies, first_step = [], [], None
for epoch in range(epochs):
    start = time.perf_counter()
    model.train()
    order = torch.randperm(len(y))
    for i in range(len(y) // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        optimizer.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        optimizer.step()
        if first_step is None:
            first_step = time.time()
    times.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        correct = sum((model(xt[i:i + 1000]).argmax(1) == yt[i:i + 1000]).sum().item()
                      for i in range(0, len(yt), 1000))
    accuracies.append(correct / len(yt))
common.report(times, accuracies, first_step)
