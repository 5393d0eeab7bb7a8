"""Training scenarios for GraphedLoss shared by the GPU tests and their CPU-emulated twins."""

from __future__ import annotations

import torch

from library.training.cuda_graphs import GraphedLoss

#: batch sizes of the two-head run: head b is first reached by a batch of 4, after a batch of 2 was graphed
TWO_HEAD_SIZES = (2, 2, 4, 4, 2, 4, 4)


def two_head_run(device: str, graphed: bool) -> tuple[torch.nn.Module, GraphedLoss | None]:
    """SGD on a body and two heads, head b reached only by batches of 4; graphed or eager.

    The first batch (of 2) never reaches head b, so b has no gradient buffer, and the graph that the
    second batch of 4 would capture gives b a gradient its replays would drop: that capture must be refused.
    """
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"body": torch.nn.Linear(6, 8), "a": torch.nn.Linear(8, 1),
                               "b": torch.nn.Linear(8, 1)}).to(device)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(net["body"](x))
        out = net["a"](h) + (net["b"](h) if x.shape[0] == 4 else 0)
        return out.square().mean()

    gl = GraphedLoss(lambda b: loss_of(b["x"]), lambda loss: loss.backward(), list(net.parameters())) \
        if graphed else None
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for n in TWO_HEAD_SIZES:
        x = torch.randn(n, 6, generator=g).to(device)
        if gl is not None:
            gl.loss_and_backward({"x": x})
        else:
            loss_of(x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net, gl


def two_head_adafactor_run(device: str, graphed: bool) -> tuple[torch.nn.Module, GraphedLoss | None]:
    """Two heads with the Adafactor step inside the graphs (``GraphedLoss.step_inside``), as the trainer
    does it; head b is reached from the second batch on, which is the one captured: its first gradient
    would create optimizer state while capturing (graph memory another replay may overwrite), so that
    capture must be refused and the run goes on eagerly."""
    from library.training.adafactor import Adafactor

    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"body": torch.nn.Linear(6, 8), "a": torch.nn.Linear(8, 1),
                               "b": torch.nn.Linear(8, 1)}).to(device)
    opt = Adafactor(net.parameters(), lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False)
    opt.use_device_factors(torch.device(device))
    calls = [0]

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        h = torch.tanh(net["body"](x))
        out = net["a"](h) + (net["b"](h) if calls[0] >= 2 else 0)
        return out.square().mean()

    def backward_and_step(loss: torch.Tensor) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    gl = None
    if graphed:
        gl = GraphedLoss(lambda b: loss_of(b["x"]), lambda loss: loss.backward(), list(net.parameters()))
        gl.step_inside(backward_and_step, opt.state_probe, lambda: opt.state)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(2, 6, generator=g).to(device)
        number = opt.steps_taken() + 1
        opt.fill_device_factors(number)
        if gl is not None:
            gl.loss_and_backward({"x": x})
        else:
            backward_and_step(loss_of(x))
        opt.count_step(number)
    return net, gl
