"""The embed stage: one L2-normalised 512-d vector per slide (spec §5).

For each slide, V views of k tiles from its plain (non-augmented) features: by default min(k V, N)
tiles drawn without replacement and cut into consecutive views of k (the last may be shorter; a slide
with fewer than k tiles gives one view of all of them), as the maintained reference does;
``with_replacement`` draws V views of k tiles with replacement. Each view's pooled output (before the
projector) is averaged over the views and L2-normalised. Level-0 coordinates are used as in training.
Views of many slides run through the model together; with the sparse aggregator every view keeps its
own spatial size, so results equal the reference's one-view-per-forward inference.

Output ``embeddings.h5``: ``ids`` (S,) str, ``embeddings`` (S, 512) float32, attributes (checkpoint
checksum, views, tiles per view, seed, encoder, aggregator); ``--format npy`` also writes the
reference's ``embeddings.npy`` + ``ids.npy``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from . import __version__
from .checkpoints import SlideCheckpoint, load_into, read_slide_checkpoint
from .encoders.weights import file_checksum
from .errors import GigasslError
from .features import FeatureFile, feature_files
from .h5files import atomic_h5, read_strings, write_attrs
from .outputs import atomic_file
from .runtime import resolve_device, slide_seed
from .step_inputs import place
from .store import StoreFile


@dataclass(frozen=True)
class EmbedParams:
    views: int = 100
    tiles_per_view: int = 5
    with_replacement: bool = False
    seed: int = 0
    batch_views: int = 2048
    device: str = "auto"


def iter_slides(source: str, warn=print) -> Iterator[tuple[str, np.ndarray, np.ndarray, dict]]:
    """(slide_id, features float32 (N, D), coords int64 (N, 2), attrs) from a store or a features folder
    (encode's output folder or its features/). In a folder, a truncated or damaged feature file is
    reported through `warn` and left out, and incomplete ones are passed over."""
    if not os.path.isdir(source):
        with StoreFile(source) as store:
            for i, sid in enumerate(store.ids):
                feats, coords = store.slide(i)
                yield sid, feats.astype(np.float32), coords, store.attrs
        return
    for f in feature_files(source):
        try:
            fh = FeatureFile(f)
        except GigasslError as err:
            warn(f"skipped {err}")
            continue
        with fh:
            if not fh.complete:
                continue
            try:
                feats, coords = fh.features().astype(np.float32), fh.coords()
            except GigasslError as err:  # damaged arrays behind a readable header
                warn(f"skipped {err}")
                continue
        yield fh.slide_id, feats, coords, fh.attrs


def view_indices(n: int, p: EmbedParams, gen: torch.Generator) -> list[torch.Tensor]:
    """Tile indices of each view of a slide with n tiles."""
    k = p.tiles_per_view
    if n == 0:
        return []
    if p.with_replacement:
        return list(torch.randint(0, n, (p.views, k), generator=gen))
    take = torch.randperm(n, generator=gen)[: min(k * p.views, n)]
    return list(torch.split(take, k))


def load_backbone(checkpoint: str, device: torch.device) -> tuple[torch.nn.Module, SlideCheckpoint]:
    """The aggregator of any supported slide checkpoint (ours, the original's, Democratizing_WSI's)."""
    from .train import build_model

    ckpt = read_slide_checkpoint(checkpoint)
    model = build_model(ckpt.aggregator, ckpt.in_dim)
    load_into(model, ckpt.state, "backbone.")
    return model.backbone.to(device).eval(), ckpt


def embed(source: str, checkpoint: str, out: str, p: EmbedParams, fmt: str = "h5", log=print) -> dict:
    device = resolve_device(p.device)
    backbone, ckpt = load_backbone(checkpoint, device)
    log(f"loaded {ckpt.describe()}")
    in_dim = ckpt.in_dim
    per_view = backbone.per_view_inference
    ids, sums, counts, empty = [], [], [], []
    pending: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}  # view size -> (slide, feats, locs)
    encoder = None

    def flush(size: int) -> None:
        batch = pending.pop(size, [])
        if not batch:
            return
        f = torch.stack([b[1] for b in batch]).to(device)
        # planned on the host (sparse-layer4: every index of the forward), then one copy to the device
        where = place(backbone.plan(torch.stack([b[2] for b in batch]), per_view=per_view,
                                    pad=device.type == "cuda"), device)
        with torch.inference_mode():
            pooled = backbone(f, where)
        for (slide, _, _), vec in zip(batch, pooled.float().cpu(), strict=True):
            sums[slide] += vec
            counts[slide] += 1

    for sid, feats, coords, attrs in iter_slides(source, warn=log):
        encoder = encoder or attrs.get("encoder")
        if feats.shape[1] != in_dim:
            raise GigasslError(f"{sid}: {feats.shape[1]}-d features, but the checkpoint was trained on {in_dim}-d "
                               f"(encoder {ckpt.raw.get('store_attrs', {}).get('encoder', 'unknown')})")
        if not np.isfinite(feats).all():
            raise GigasslError(f"{sid}: features contain NaN or inf; re-encode this slide")
        gen = torch.Generator().manual_seed(slide_seed(p.seed, sid))
        views = view_indices(len(feats), p, gen)
        if not views:
            empty.append(sid)
            continue
        slide = len(ids)
        ids.append(sid)
        sums.append(torch.zeros(512))
        counts.append(0)
        f_t, c_t = torch.from_numpy(feats), torch.from_numpy(coords)
        for idx in views:
            pending.setdefault(len(idx), []).append((slide, f_t[idx], c_t[idx]))
            if len(pending[len(idx)]) >= p.batch_views:
                flush(len(idx))
    for size in list(pending):
        flush(size)
    if not ids:
        raise GigasslError(f"{source}: no slide with tiles to embed")
    emb = torch.stack([s / c for s, c in zip(sums, counts, strict=True)])
    emb = torch.nn.functional.normalize(emb, dim=1).numpy().astype(np.float32)
    attrs = {"checkpoint": os.path.abspath(checkpoint), "checkpoint_checksum": file_checksum(checkpoint),
             "aggregator": ckpt.aggregator, "checkpoint_format": ckpt.format, "views": p.views,
             "tiles_per_view": p.tiles_per_view,
             "with_replacement": p.with_replacement, "seed": p.seed, "encoder": encoder, "version": __version__,
             "empty_slides": empty}
    with atomic_h5(out, emb.nbytes + sum(len(i) for i in ids) * 4) as fh:
        fh.create_dataset("ids", data=np.array(ids, dtype=h5py.string_dtype()))
        fh.create_dataset("embeddings", data=emb)
        write_attrs(fh, attrs)
    if fmt == "npy":
        folder = os.path.dirname(os.path.abspath(out))
        for name, array in (("embeddings.npy", emb), ("ids.npy", np.array(ids))):
            with atomic_file(os.path.join(folder, name), array.nbytes) as tmp, open(tmp, "wb") as fh:
                np.save(fh, array)
    for sid in empty:
        log(f"warning: {sid}: no tissue tiles, no embedding")
    return {"slides": len(ids), "empty": empty, "out": out}


def read_embeddings(path: str) -> tuple[list[str], np.ndarray]:
    """(ids, embeddings (S, D)) from our embeddings.h5, or the reference's embeddings.npy (ids.npy beside)."""
    if path.endswith(".npy"):
        ids_path = os.path.join(os.path.dirname(os.path.abspath(path)), "ids.npy")
        if not os.path.exists(ids_path):
            raise GigasslError(f"{path}: needs ids.npy beside it (the reference's layout)")
        return [str(i) for i in np.load(ids_path, allow_pickle=False)], np.load(path).astype(np.float64)
    try:
        with h5py.File(path, "r") as fh:
            ids = read_strings(fh["ids"])
            return ids, fh["embeddings"][:].astype(np.float64)
    except (OSError, KeyError) as err:
        raise GigasslError(f"{path}: not an embeddings file with ids and embeddings ({err})") from None
