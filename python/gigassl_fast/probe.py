"""The probe stage: linear evaluation of slide embeddings (spec §6).

scikit-learn LogisticRegression(C=10, class_weight='balanced', max_iter=1000) by default, as the
reference; ROC-AUC (binary, or one-vs-rest macro for several classes) and balanced accuracy, over
stratified k-fold cross-validation and over few-shot settings (repeated random splits with a fixed
number of training slides). With a patient_id column every split keeps a patient's slides on one side;
the reference splits by slide and lets patients leak between train and test.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import GigasslError
from .outputs import atomic_file

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class ProbeParams:
    folds: int = 10
    train_sizes: tuple[int, ...] = ()
    repeats: int = 20
    C: float = 10.0
    search_C: bool = False
    seed: int = 0


def read_labels(path: str, warn=print) -> dict[str, tuple[str, str | None]]:
    """slide_id -> (label, patient_id or None). A slide listed twice with another label or patient is an
    error naming both lines; listed twice the same, a warning."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if "slide_id" not in cols or "label" not in cols:
                raise GigasslError(f"{path}: needs a header with slide_id,label[,patient_id]; got {cols}")
            out: dict[str, tuple[str, str | None]] = {}
            first_line: dict[str, int] = {}
            for line, row in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                sid = row["slide_id"]
                if not (sid and row["label"]):
                    continue
                entry = (row["label"], row.get("patient_id") or None)
                if sid in out:
                    seen = first_line[sid]
                    if out[sid] != entry:
                        what, now, before = (("labelled", entry[0], out[sid][0]) if out[sid][0] != entry[0]
                                             else ("given patient", entry[1], out[sid][1]))
                        raise GigasslError(f"{path}:{line}: slide {sid!r} is {what} {now!r} here and {before!r} on "
                                           f"line {seen}; give each slide one label")
                    warn(f"warning: {path}:{line}: slide {sid!r} is listed twice (as on line {seen}); counted once")
                    continue
                out[sid], first_line[sid] = entry, line
            return out
    except OSError as err:
        raise GigasslError(f"{path}: cannot read the labels ({err.strerror})") from None


def mean_pool_embeddings(features_dir: str, warn=print) -> tuple[list[str], np.ndarray]:
    """The baseline: the mean of each slide's plain tile features, L2-normalised."""
    from .embed import iter_slides

    ids, rows = [], []
    for sid, feats, _coords, _attrs in iter_slides(features_dir, warn=warn):
        if len(feats):
            ids.append(sid)
            m = feats.mean(0)
            rows.append(m / max(np.linalg.norm(m), 1e-12))
    return ids, np.stack(rows).astype(np.float64)


def _classifier(p: ProbeParams, n_train: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    clf = LogisticRegression(C=p.C, class_weight="balanced", max_iter=1000)
    if p.search_C and n_train >= 6:
        return GridSearchCV(clf, {"C": list(C_GRID)}, cv=StratifiedKFold(3, shuffle=True, random_state=p.seed),
                            scoring="roc_auc_ovr")
    return clf


def _scores(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    if len(classes) == 2:
        auc = roc_auc_score(y_true, proba[:, 1])
    else:
        auc = roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=np.arange(len(classes)))
    return float(auc), float(balanced_accuracy_score(y_true, proba.argmax(1)))


def _fit_eval(x, y, train, test, p, classes):
    clf = _classifier(p, len(train)).fit(x[train], y[train])
    proba = np.zeros((len(test), len(classes)))
    proba[:, clf.classes_] = clf.predict_proba(x[test])
    return proba


def cv_splits(y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is not None:
        return list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(y, y, groups))
    return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y))


def few_shot_splits(y: np.ndarray, groups: np.ndarray | None, n_train: int, repeats: int, seed: int):
    """Random splits with n_train training slides (every class present), grouped by patient if given."""
    rng = np.random.default_rng(seed)
    units = np.unique(groups) if groups is not None else np.arange(len(y))
    members = {u: np.flatnonzero(groups == u) for u in units} if groups is not None else {u: np.array([u]) for u in units}
    splits = []
    for _ in range(repeats * 20):
        if len(splits) == repeats:
            break
        train = []
        for u in rng.permutation(units):
            if len(train) + len(members[u]) <= n_train:
                train.extend(members[u])
            if len(train) == n_train:
                break
        train = np.array(sorted(train))
        test = np.setdiff1d(np.arange(len(y)), train)
        if len(np.unique(y[train])) == len(np.unique(y)) and len(np.unique(y[test])) == len(np.unique(y)):
            splits.append((train, test))
    return splits


@dataclass
class SettingResult:
    aucs: list[float] = field(default_factory=list)
    baccs: list[float] = field(default_factory=list)
    n_train: int = 0
    oof: tuple[np.ndarray, np.ndarray] | None = None

    def summary(self) -> dict:
        return {"auc_mean": float(np.mean(self.aucs)), "auc_std": float(np.std(self.aucs)),
                "balanced_accuracy_mean": float(np.mean(self.baccs)), "n_train": int(self.n_train),
                "n_splits": len(self.aucs)}


def evaluate(ids: list[str], x: np.ndarray, labels: dict, p: ProbeParams, warn=print) -> tuple[dict, dict]:
    """Runs every setting on the labelled slides; returns (settings, extra) where extra holds the ROC data."""
    known = [i for i, sid in enumerate(ids) if sid in labels]
    unlabelled = len(ids) - len(known)
    unknown = sorted(set(labels) - set(ids))
    if unlabelled:
        warn(f"warning: {unlabelled} slides of the embeddings have no label; left out")
    if unknown:
        warn(f"warning: {len(unknown)} labelled slides have no embedding (e.g. {', '.join(unknown[:3])}); left out")
    if not known:
        raise GigasslError("no slide has both an embedding and a label; check that slide_id values match")
    x = x[known]
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise GigasslError(f"embeddings contain NaN or inf for {', '.join(ids[known[i]] for i in np.flatnonzero(bad)[:3])}")
    names = [labels[ids[i]][0] for i in known]
    classes, y = np.unique(names, return_inverse=True)
    if len(classes) < 2:
        raise GigasslError(f"only one class ({str(classes[0])!r}) among the labelled slides; a probe needs two or more")
    pats = [labels[ids[i]][1] for i in known]
    groups = np.array(pats) if all(pats) else None
    if any(pats) and groups is None:
        warn("warning: patient_id is missing for some slides; splitting by slide")
    settings: dict[str, SettingResult] = {}
    min_units = min(len(np.unique(groups[y == c])) if groups is not None else int((y == c).sum())
                    for c in range(len(classes)))
    folds = p.folds
    if min_units < 2:
        warn(f"warning: a class has fewer than 2 {'patients' if groups is not None else 'slides'}; "
             "cross-validation skipped")
    else:
        if min_units < folds:
            warn(f"warning: --folds {folds} exceeds the smallest class ({min_units}); using {min_units} folds")
            folds = min_units
        r = SettingResult()
        oof = np.zeros((len(y), len(classes)))
        for train, test in cv_splits(y, groups, folds, p.seed):
            proba = _fit_eval(x, y, train, test, p, classes)
            oof[test] = proba
            if len(np.unique(y[test])) == len(classes):
                auc, bacc = _scores(y[test], proba, classes)
                r.aucs.append(auc)
                r.baccs.append(bacc)
            r.n_train = max(r.n_train, len(train))
        r.oof = (y, oof)
        if r.aucs:
            settings[f"cv{folds}"] = r
    for n in p.train_sizes:
        if n >= len(y) - len(classes):
            warn(f"warning: --train-size {n} leaves too few test slides of {len(y)}; skipped")
            continue
        r = SettingResult(n_train=n)
        for train, test in few_shot_splits(y, groups, n, p.repeats, p.seed):
            auc, bacc = _scores(y[test], _fit_eval(x, y, train, test, p, classes), classes)
            r.aucs.append(auc)
            r.baccs.append(bacc)
        if r.aucs:
            settings[f"train{n}"] = r
        else:
            warn(f"warning: --train-size {n}: no split with every class on both sides; skipped")
    if not settings:
        raise GigasslError("no setting could run (too few slides per class for the folds and train sizes asked)")
    return settings, {"classes": [str(c) for c in classes], "n_slides": int(len(y)), "grouped": groups is not None}


def roc_png(path: str, curves: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """A small ROC plot drawn with PIL (no matplotlib needed): one polyline per (name, y, score)."""
    from PIL import Image, ImageDraw
    from sklearn.metrics import roc_curve

    size, pad = 480, 50
    img = Image.new("RGB", (size + 2 * pad, size + 2 * pad), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad, pad + size, pad + size], outline="black")
    d.line([pad, pad + size, pad + size, pad], fill=(180, 180, 180))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for i, (name, y, score) in enumerate(curves):
        fpr, tpr, _ = roc_curve(y, score)
        pts = [(pad + f * size, pad + size - t * size) for f, t in zip(fpr, tpr, strict=True)]
        d.line(pts, fill=colours[i % len(colours)], width=3)
        d.text((pad + 10, pad + 10 + 14 * i), name, fill=colours[i % len(colours)])
    d.text((pad + size // 2 - 40, pad + size + 15), "false positive rate", fill="black")
    d.text((5, pad - 20), "true positive rate", fill="black")
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")


def run_probe(embeddings: str, labels_csv: str, out_dir: str, p: ProbeParams, baseline: str | None = None,
              warn=print) -> dict:
    from .embed import read_embeddings

    labels = read_labels(labels_csv, warn)
    sources = [("giga-ssl", *read_embeddings(embeddings))]
    if baseline:
        sources.append(("mean-pool", *mean_pool_embeddings(baseline, warn)))
    settings, curves, extra = {}, [], {}
    for name, ids, x in sources:
        res, extra = evaluate(ids, x, labels, p, warn)
        for key, r in res.items():
            settings[key if name == "giga-ssl" else f"{name}/{key}"] = r.summary()
            if r.oof is not None and len(extra["classes"]) == 2:
                curves.append((f"{name} {key} AUC {r.summary()['auc_mean']:.3f}", r.oof[0], r.oof[1][:, 1]))
    config = {**asdict(p), "embeddings": os.path.abspath(embeddings), "labels": os.path.abspath(labels_csv),
              "baseline": os.path.abspath(baseline) if baseline else None,
              "classifier": f"LogisticRegression(C={'search' if p.search_C else p.C}, class_weight='balanced', max_iter=1000)",
              **extra}
    report = {"settings": settings, "config": config}
    os.makedirs(out_dir, exist_ok=True)
    with atomic_file(os.path.join(out_dir, "probe.json")) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    lines = ["| setting | AUC mean ± std | balanced accuracy | n_train | splits |", "|---|---|---|---|---|"]
    for key, s in settings.items():
        lines.append(f"| {key} | {s['auc_mean']:.3f} ± {s['auc_std']:.3f} | {s['balanced_accuracy_mean']:.3f} | "
                     f"{s['n_train']} | {s['n_splits']} |")
    with atomic_file(os.path.join(out_dir, "probe.md")) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(f"# Linear probe\n\n{extra['n_slides']} slides, classes {', '.join(extra['classes'])}; "
                 f"{config['classifier']}; split by {'patient' if extra['grouped'] else 'slide'}.\n\n" + "\n".join(lines) + "\n")
    if curves:
        roc_png(os.path.join(out_dir, "roc.png"), curves)
    report["table"] = "\n".join(lines)
    return report
