"""Running training steps (two forwards, NT-Xent, backward, the optimiser's step): eagerly, or replayed
from CUDA graphs captured once per shape bucket (``train --cuda-graphs``).

A step's inputs come from ``step_inputs.prepare_step`` with every index already on the device, and the step
reads nothing back; its loss and collapse statistic are copied to pinned host memory behind it (``Readback``),
and the loop reads them one step later, waiting for that step alone. A graph is captured the first time a
bucket (``StepInputs.key``) is met: a few warm-up steps on a side stream compile the kernels and create the
optimiser's state, the model and optimiser are then put back as they were, and the captured step is replayed
from then on with the new inputs copied into its own. Keys beyond ``max_graphs`` run eagerly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .errors import GigasslError
from .step_inputs import StepInputs


def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """sqrt(d) x the mean per-dimension spread of the normalised (B, d) embeddings: 1 for embeddings
    spread evenly over the sphere, 0 when collapsed to a point."""
    with torch.no_grad():
        return torch.nn.functional.normalize(z.float(), dim=1).std(dim=0).mean() * z.shape[1] ** 0.5


class StepClock:
    """When a step started: a CUDA event on a GPU (its time on the device, whatever the host does
    meanwhile), the host clock otherwise."""

    def __init__(self, cuda: bool) -> None:
        self.event = torch.cuda.Event(enable_timing=True) if cuda else None
        if self.event is not None:
            self.event.record()
        self.t0 = time.perf_counter()


class Readback:
    """A step's scalars copied to the host behind the work that makes them: on a GPU into pinned memory
    with an event, so that ``values()`` waits for this copy only, not for steps queued after it; and the
    step's own duration (``seconds``, from its `clock`)."""

    def __init__(self, *scalars: torch.Tensor, clock: StepClock | None = None) -> None:
        t = torch.stack([x.detach().float().reshape(()) for x in scalars])
        self.event, self.clock = None, clock
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event(enable_timing=clock is not None and clock.event is not None)
            self.event.record()
        else:
            self.host = t
        self._seconds = None if clock is None else time.perf_counter() - clock.t0

    def values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()

    @property
    def seconds(self) -> float | None:
        """The step's duration: on a GPU between its events (after ``values()``), else on the host clock."""
        if self.clock is not None and self.clock.event is not None and self.event is not None:
            self.event.synchronize()
            return self.clock.event.elapsed_time(self.event) / 1e3
        return self._seconds


def make_optimizer(model: torch.nn.Module, weight_decay: float, graphs: bool) -> torch.optim.Adam:
    """Adam; for CUDA graphs its state and learning rate live on the device (``capturable``)."""
    opt = torch.optim.Adam(model.parameters(), lr=0.0, weight_decay=weight_decay)
    return prepare_optimizer(opt, graphs)


def prepare_optimizer(opt: torch.optim.Adam, graphs: bool) -> torch.optim.Adam:
    """Sets `opt` up for graphed or eager steps, also after loading a checkpoint's state (which carries
    the flags of the run that saved it)."""
    for group in opt.param_groups:
        group["capturable"] = graphs
        dev = group["params"][0].device
        if graphs:
            lr = group["lr"]
            group["lr"] = lr if isinstance(lr, torch.Tensor) and lr.device == dev else \
                torch.tensor(float(lr), dtype=torch.float32, device=dev)
        elif isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
        for p in group["params"]:
            state = opt.state.get(p, {})
            if "step" in state:  # on the device when capturable; on the host otherwise (Adam reads it there)
                state["step"] = state["step"].detach().to(dev if graphs else "cpu", torch.float32)
    # A graphed run's warm-up steps, and the steps of buckets beyond max_graphs, run uncaptured on purpose.
    opt._warned_capturable_if_run_uncaptured = graphs
    return opt


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # in place: a captured step reads this very tensor
        else:
            group["lr"] = lr


class EagerStep:
    """One step run op by op."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, temperature: float, bf16: bool) -> None:
        self.model, self.opt, self.temperature, self.bf16 = model, opt, temperature, bf16

    def __call__(self, inputs: StepInputs, lr: float) -> Readback:
        """Queues the step; the returned loss and collapse statistic are read with ``.values()``."""
        clock = StepClock(inputs.views[0][0].device.type == "cuda")
        return Readback(*self.run(inputs, lr), clock=clock)

    def run(self, inputs: StepInputs, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        from .train import contrastive_step

        set_lr(self.opt, lr)
        self.opt.zero_grad(set_to_none=True)
        loss, z1 = contrastive_step(self.model, *inputs.views, self.temperature, self.bf16)
        self.opt.step()
        return loss, collapse_std(z1)


@dataclass
class _Captured:
    graph: object  # torch.cuda.CUDAGraph
    index: list[torch.Tensor]  # the captured step's own input tensors
    loss: torch.Tensor
    std: torch.Tensor


class GraphedStep(EagerStep):
    """Steps replayed from one CUDA graph per shape bucket; equal to ``EagerStep`` up to float32 rounding
    (tools/gpu_check.py checks it). Single process only: collectives inside a captured step are not
    supported here."""

    WARMUP = 3

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, temperature: float, bf16: bool,
                 max_graphs: int = 8) -> None:
        super().__init__(model, opt, temperature, bf16)
        if not all(isinstance(g["lr"], torch.Tensor) and g.get("capturable") for g in opt.param_groups):
            raise GigasslError("internal: a graphed step needs prepare_optimizer(opt, graphs=True)")
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self.eager_steps = 0

    def run(self, inputs: StepInputs, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        set_lr(self.opt, lr)
        entry = self.graphs.get(inputs.key)
        if entry is None and len(self.graphs) < self.max_graphs:
            entry = self.graphs[inputs.key] = self._capture(inputs)
        if entry is None:
            self.eager_steps += 1
            return super().run(inputs, lr)
        torch._foreach_copy_(entry.index, inputs.tensors())
        entry.graph.replay()
        return entry.loss, entry.std  # read (Readback copies them) before the next replay overwrites them

    def _state(self) -> list[torch.Tensor]:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        for state in self.opt.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        return tensors

    def _capture(self, inputs: StepInputs) -> _Captured:
        from .train import contrastive_step

        # The warm-up steps change the weights and create the optimiser's state: both are put back.
        before = {id(t): t.detach().clone() for t in self._state()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self.opt.zero_grad(set_to_none=True)
                contrastive_step(self.model, *inputs.views, self.temperature, self.bf16)
                self.opt.step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for t in self._state():
                saved = before.get(id(t))
                t.copy_(saved) if saved is not None else t.zero_()  # state born in the warm-up: fresh
        graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        # One memory pool for every bucket's graph: they replay one at a time, on one stream.
        pool = next(iter(self.graphs.values())).graph.pool() if self.graphs else None
        try:
            with torch.cuda.graph(graph, pool=pool):
                loss, z1 = contrastive_step(self.model, *inputs.views, self.temperature, self.bf16)
                self.opt.step()
                std = collapse_std(z1)
        except RuntimeError as err:  # an operation that cannot be captured, or out of memory
            msg = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise GigasslError(f"CUDA graph capture failed for the step shapes {inputs.key}: {msg}; "
                               "train without --cuda-graphs") from None
        # The captured step read `inputs`' tensors: they are its static inputs from now on.
        return _Captured(graph, inputs.tensors(), loss, std)
