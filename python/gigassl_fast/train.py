"""The train stage: slide-level SimCLR on a packed store (spec §4).

Each step draws B slides, two independent views of each (``step_inputs.prepare_step``, on the host, with
sparse-layer4's plan), runs the two view batches through the model in two separate forwards (batch-norm
statistics per view batch, as the reference), and minimises NT-Xent (T = 0.05). Adam at lr = base_lr * B / 256
with a linear warm-up over the first epochs and cosine decay to 0, per step. Weight decay is off by default:
the reference's config sets 5e-4 but never passes it to Adam.

Outputs in RUN: ``checkpoint_eNNNN.pt`` (every --checkpoint-every epochs), ``checkpoint_last.pt``,
``log.jsonl`` (one line per step), ``config.json``.
"""

from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from . import __version__
from .aggregators import build_aggregator, list_aggregators
from .distributed import convert_global_bn
from .errors import GigasslError
from .outputs import atomic_file, nearly_full, write_error
from .runtime import check_device, check_precision, rank_seed, resolve_device, train_precision
from .ssl import SimCLRMIL, nt_xent
from .step_inputs import prepare_step
from .store import Store
from .train_step import EagerStep, GraphedStep, make_optimizer, prepare_optimizer


@dataclass(frozen=True)
class TrainParams:
    aggregator: str = "sparse-layer4"
    epochs: int = 100
    batch_size: int = 256
    tiles_per_view: int = 5
    base_lr: float = 0.03
    warmup_epochs: int = 10
    weight_decay: float = 0.0
    temperature: float = 0.05
    seed: int = 0
    checkpoint_every: int = 10
    resnet18_weights: str | None = None
    init: str | None = None
    sync_bn: bool = False
    device: str = "auto"
    stop_at_epoch: int | None = None
    precision: str = "auto"
    cuda_graphs: bool = False

    def validate(self) -> TrainParams:
        if self.aggregator not in list_aggregators():
            raise GigasslError(f"--aggregator must be one of {', '.join(list_aggregators())} (got {self.aggregator!r})")
        for name in ("epochs", "batch_size", "tiles_per_view", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise GigasslError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.batch_size < 2:
            raise GigasslError(f"--batch-size must be >= 2 for a contrastive loss (got {self.batch_size})")
        if not self.base_lr > 0:
            raise GigasslError(f"--lr must be > 0 (got {self.base_lr})")
        check_precision(self.precision)
        check_device(self.device)
        if self.init and self.resnet18_weights:
            raise GigasslError("--init and --resnet18-weights both set the starting weights; give one")
        return self


def learning_rate(step: int, steps_per_epoch: int, p: TrainParams, world: int = 1) -> float:
    lr = p.base_lr * p.batch_size * world / 256
    warm = p.warmup_epochs * steps_per_epoch
    total = p.epochs * steps_per_epoch
    if step < warm:
        return lr * step / warm
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


#: Settings a resumed run may change without changing what it computes.
# precision: compared as resolved (compute_precision), since auto means different things on different machines
FREE_ON_RESUME = ("checkpoint_every", "device", "stop_at_epoch", "resnet18_weights", "init", "precision",
                  "cuda_graphs")


def _atomic_save(obj: dict, path: str) -> None:
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(obj))
    with atomic_file(path, nbytes) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch reports a full disk as "unexpected pos ..."
            if nearly_full(tmp):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp) from err
            raise


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _option(name: str) -> str:
    return {"base_lr": "--lr", "store": "STORE", "compute_precision": "--precision (as resolved on this machine)"}.get(
        name, "--" + name.replace("_", "-"))


def changed_settings(saved: dict, params: TrainParams) -> dict[str, list]:
    """{setting: [checkpoint's value, this run's]} for the settings that change what a resumed run computes."""
    now = asdict(params)
    return {k: [saved.get(k), v] for k, v in now.items() if k not in FREE_ON_RESUME and saved.get(k) != v}


def _append_log(path: str, record: dict) -> None:
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError as err:
        raise write_error(path, err) or err from None


def _step_of(line: str) -> int | None:
    """The step a log line is about (0 for events); None for a line cut short by a kill or a full disk."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return None


def _truncate_log(path: str, step: int) -> None:
    """Drops the lines a killed run logged after its last checkpoint, so a resumed run logs each step once."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    keep = [ln for ln in lines if _step_of(ln) is not None and _step_of(ln) <= step]
    if len(keep) != len(lines):
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(keep)


def load_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise GigasslError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "params" not in ckpt:
        raise GigasslError(f"{path}: not a gigassl-fast training checkpoint")
    return ckpt


def build_model(aggregator: str, in_dim: int, resnet18_weights: str | None = None) -> SimCLRMIL:
    state = None
    if resnet18_weights:
        from .encoders.resnet import TORCHVISION_RESNET18
        from .encoders.weights import load_checkpoint as load_weights
        from .encoders.weights import resolve_weights

        state = load_weights(resolve_weights(TORCHVISION_RESNET18 if resnet18_weights == "imagenet" else resnet18_weights))
    return SimCLRMIL(build_aggregator(aggregator, in_dim, state))


def init_from(model: SimCLRMIL, path: str, aggregator: str, in_dim: int) -> str:
    """Starts `model` from a slide checkpoint in any supported layout (fine-tuning); returns what was loaded."""
    from .checkpoints import load_into, read_slide_checkpoint

    ckpt = read_slide_checkpoint(path)
    if ckpt.aggregator != aggregator or ckpt.in_dim != in_dim:
        raise GigasslError(f"--init {path}: a {ckpt.aggregator} model on {ckpt.in_dim}-d tiles; this run trains "
                           f"{aggregator} on {in_dim}-d tiles (set --aggregator, or pack features of that size)")
    load_into(model, ckpt.state, ("backbone.", "projector.") if ckpt.has_projector else "backbone.")
    return ckpt.describe() + ("" if ckpt.has_projector else "; projector initialised afresh")


def contrastive_step(model: torch.nn.Module, view1: tuple[torch.Tensor, torch.Tensor],
                     view2: tuple[torch.Tensor, torch.Tensor], temperature: float,
                     bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Two separate forwards (batch-norm statistics per view batch), NT-Xent over the global batch,
    backward, and under torch.distributed the gradient of the global loss on every rank.

    Returns (loss, z1). Each rank computes the same global loss; all_gather's backward sums every
    rank's gradient into each rank's own rows, so each rank holds world x its share, and averaging
    over ranks gives the full gradient, as one process with the whole batch would.
    """
    device_type = view1[0].device.type
    # cache_enabled=False: autocast's cache of cast weights must not outlive a captured step (CUDA graphs)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        z1 = model(*view1)
        z2 = model(*view2)
    # The loss in float32: at temperature 0.05 bf16 logits would lose the small similarity differences.
    z1, z2 = z1.float(), z2.float()
    loss = nt_xent(z1, z2, temperature)
    # Backward whatever the loss: testing it here would make the host wait for the device. A non-finite
    # loss leaves non-finite weights after the optimiser's step; train reads each loss a step later and
    # stops with an error before it saves anything, so no checkpoint holds them.
    loss.backward()
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
    return loss.detach(), z1.detach()


def train(store_path: str, out_dir: str, params: TrainParams, resume: bool = False, log=print,
          force_resume: bool = False) -> dict:
    """Trains and returns {'checkpoint': path, 'steps': n, 'last_loss': x}.

    `resume` continues from checkpoint_last.pt and refuses settings that change the run (`changed_settings`)
    unless `force_resume`; then the change is logged in log.jsonl and config.json keeps the original."""
    params.validate()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = resolve_device(params.device)
    precision = train_precision(params.precision, device)
    if params.cuda_graphs and device.type != "cuda":
        raise GigasslError(f"--cuda-graphs needs a CUDA device (this run is on {device}); drop --cuda-graphs")
    if params.cuda_graphs and world > 1:
        raise GigasslError("--cuda-graphs runs one process only (a captured step cannot hold the gradient "
                           "all-reduce); drop it under torchrun")
    bf16 = precision == "bf16"
    store = Store(store_path, device)
    global_batch = params.batch_size * world
    if store.n_slides < global_batch:
        raise GigasslError(f"{store_path}: {store.n_slides} slides, fewer than the batch of {global_batch}; "
                           f"use --batch-size <= {store.n_slides // world}")
    os.makedirs(out_dir, exist_ok=True)
    last = os.path.join(out_dir, "checkpoint_last.pt")
    torch.manual_seed(params.seed)  # parameter initialisation; sampling uses its own generators below
    model = build_model(params.aggregator, store.dim, params.resnet18_weights)
    if params.init and not resume:
        log(f"starting from {init_from(model, params.init, params.aggregator, store.dim)}")
    model = model.to(device)
    if params.sync_bn and world > 1:
        model = convert_global_bn(model)
        model.backbone.configure_distributed()
    opt = make_optimizer(model, params.weight_decay, params.cuda_graphs)
    gen = torch.Generator(device="cpu").manual_seed(rank_seed(params.seed, rank))
    order_gen = torch.Generator().manual_seed(params.seed)  # same slide order on every rank
    start_epoch, step = 0, 0
    log_path = os.path.join(out_dir, "log.jsonl")
    changed: dict[str, list] = {}
    if resume:
        if not os.path.exists(last):
            raise GigasslError(f"--resume: no {last} to resume from")
        ckpt = load_checkpoint(last)
        if ckpt["params"]["aggregator"] != params.aggregator:
            raise GigasslError(f"{last}: trained with --aggregator {ckpt['params']['aggregator']}, not {params.aggregator}")
        if int(ckpt.get("in_dim", store.dim)) != store.dim:
            raise GigasslError(f"{out_dir}: the run was trained on {ckpt['in_dim']}-d features; {store_path} holds "
                               f"{store.dim}-d ones; resume with the run's own store")
        changed = changed_settings(ckpt["params"], params)
        if ckpt.get("store_slides", store.n_slides) != store.n_slides:
            changed["store"] = [f"{ckpt.get('store')} ({ckpt['store_slides']} slides)",
                                f"{os.path.abspath(store_path)} ({store.n_slides} slides)"]
        # auto resolves per machine: a run moved between an AMX CPU and another one would change precision.
        # Checkpoints from before --precision computed in float32.
        saved_precision = ckpt.get("compute_precision", "fp32")
        if saved_precision != precision:
            changed["compute_precision"] = [saved_precision, precision]
        if changed and not force_resume:
            what = ", ".join(f"{_option(k)} {a} -> {b}" for k, (a, b) in changed.items())
            raise GigasslError(f"{out_dir}: --resume with settings that change the run ({what}); pass the original "
                               "values, or --force-resume to continue with the new ones")
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        prepare_optimizer(opt, params.cuda_graphs)
        gen.set_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        order_gen.set_state(ckpt["order_rng"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
    elif os.path.exists(last):
        raise GigasslError(f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out")
    store_attrs = {k: v for k, v in store.attrs.items() if isinstance(v, (int, float, str))}
    if rank == 0 and resume:
        _truncate_log(log_path, step)
        if changed:
            _append_log(log_path, {"event": "resume", "at_step": step, "changed": changed})
            log(f"resuming at step {step} with changed settings: {changed} (config.json keeps the original)")
    elif rank == 0:
        config = {"params": asdict(params), "compute_precision": precision,
                  "store": os.path.abspath(store_path), "world_size": world,
                  "store_attrs": store_attrs, "version": __version__}
        with atomic_file(os.path.join(out_dir, "config.json")) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)
    steps_per_epoch = store.n_slides // global_batch
    stats = {"collapse_ema": None, "collapse": 0.0, "last_loss": float("nan"), "lr": 0.0}
    if resume:  # the log's moving average and last loss go on as if the run had not stopped
        stats.update(collapse_ema=ckpt.get("collapse_ema"), last_loss=ckpt.get("last_loss", float("nan")))
    model.train()
    pad = device.type == "cuda"  # static shapes where launches cost: the steps of a bucket look alike
    run_step = GraphedStep(model, opt, params.temperature, bf16) if params.cuda_graphs else \
        EagerStep(model, opt, params.temperature, bf16)

    def finish(record: tuple) -> None:
        """Reads a launched step's loss back (the one wait per step, a step late: for that step, not the one
        queued after it) and logs it."""
        at, epoch, lr, readback = record
        loss, std = readback.values()
        if not math.isfinite(loss):
            good = last if os.path.exists(last) else "none yet"
            raise GigasslError(f"loss became {loss} at step {at + 1} (epoch {epoch}); last good checkpoint: {good}; "
                               "try a lower --lr")
        ema = stats["collapse_ema"]
        stats["collapse_ema"] = ema = std if ema is None else 0.99 * ema + 0.01 * std
        rate = 2 * global_batch / max(readback.seconds, 1e-9)  # this step's own time
        stats.update(last_loss=loss, lr=lr, collapse=max(0.0, 1 - ema))
        if rank == 0:
            _append_log(log_path, {"epoch": epoch, "step": at + 1, "loss": loss, "lr": lr, "views_per_s": rate,
                                   "collapse": stats["collapse"]})

    last_loss = stats["last_loss"]
    end_epoch = min(params.epochs, params.stop_at_epoch or params.epochs)
    for epoch in range(start_epoch, end_epoch):
        perm = torch.randperm(store.n_slides, generator=order_gen)

        def inputs(it: int, perm: torch.Tensor = perm):
            batch = perm[it * global_batch:(it + 1) * global_batch][rank * params.batch_size:(rank + 1) * params.batch_size]
            return prepare_step(store.aug_features, store.aug_coords, batch, params.tiles_per_view, gen, device,
                                model.backbone, pad=pad)

        upcoming = inputs(0) if steps_per_epoch else None
        pending = None
        for it in range(steps_per_epoch):
            lr = learning_rate(step, steps_per_epoch, params, world)
            launched = (step, epoch, lr, run_step(upcoming, lr))  # returns once queued on a GPU
            step += 1
            if it + 1 < steps_per_epoch:
                upcoming = inputs(it + 1)  # the host prepares the next step while the device runs this one
            if pending is not None:
                finish(pending)
            pending = launched
        if pending is not None:
            finish(pending)
        last_loss, lr, collapse = stats["last_loss"], stats["lr"], stats["collapse"]
        # Every rank's sampler state goes into the checkpoint, so a resumed run draws the same views.
        rng = [gen.get_state()]
        if world > 1:
            rng = [None] * world
            dist.all_gather_object(rng, gen.get_state())
        bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:  # e.g. batch-norm running variances overflowed while the loss stayed finite
            good = last if os.path.exists(last) else "none yet"
            raise GigasslError(f"non-finite weights or statistics after epoch {epoch + 1} ({', '.join(bad[:3])}"
                               f"{' ...' if len(bad) > 3 else ''}); last good checkpoint: {good}; try a lower --lr")
        if rank == 0:
            state = {"epoch": epoch + 1, "collapse_ema": stats["collapse_ema"], "last_loss": last_loss,
                     "step": step, "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                     "rng": rng, "order_rng": order_gen.get_state(), "params": asdict(params), "in_dim": store.dim,
                     "store": os.path.abspath(store_path), "store_slides": store.n_slides,
                     "compute_precision": precision,
                     "store_attrs": store_attrs, "version": __version__}
            if (epoch + 1) % params.checkpoint_every == 0:
                _atomic_save(state, os.path.join(out_dir, f"checkpoint_e{epoch + 1:04d}.pt"))
            _atomic_save(state, last)
            log(f"epoch {epoch + 1}/{params.epochs}  loss {last_loss:.4f}  lr {lr:.2e}  collapse {collapse:.3f}")
    return {"checkpoint": last, "steps": step, "last_loss": last_loss}
