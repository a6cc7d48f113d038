"""Drift: are the served inputs still like the training data, and the answers' mix like before?

    protege serve --task TASK_FILE --drift

Built at start from the task's dataset (the one the serving run was trained on):

- **Input drift.** Every served input is embedded (MiniLM by default, off the request's path:
  on one core at the lowest CPU priority, in the time the model leaves free) and its
  distance to the nearest training input taken (1 - cosine similarity). In distribution, 5% of inputs lie beyond `q95`, the 95th
  percentile of the same distance for inputs the model did not train on (the validation
  split's, and each training input's distance to the other training inputs). Over the last
  `window` served inputs, the count beyond `q95` is tested against Binomial(n, 0.05): an
  alarm when its one-sided p-value falls under `alpha`.
- **Label-mix drift** (classification): the specialist's answers over the window against
  the answers it gave on the validation split, both samples (chi-square test of the 2 x K
  table, alarm under `alpha`).
- **Confidence**: the share of answers under the serving threshold over the window.

Statistics are computed once `min_n` inputs are in the window; `/metrics` exposes them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger("protege.serve")


class Reference:
    """What in-distribution traffic looks like to the serving run."""

    def __init__(self, train_emb: np.ndarray, baseline: np.ndarray, label_counts: dict[str, int] | None,
                 basis: str):
        self.train_emb, self.baseline, self.label_counts, self.basis = train_emb, baseline, label_counts, basis
        self.q95 = float(np.quantile(baseline, 0.95))

    @classmethod
    def build(cls, dataset, encoder, predict=None, labels: list[str] | None = None, max_train: int = 5000,
              seed: int = 0) -> "Reference":
        rng = np.random.default_rng(seed)
        train = dataset.split("train")
        if len(train) < 20:
            raise ValueError(f"dataset {dataset.id} has {len(train)} train rows: too few to tell drift from noise")
        if len(train) > max_train:
            train = [train[i] for i in sorted(rng.choice(len(train), max_train, replace=False))]
        val = dataset.split("validation")
        emb = encoder([r["input"] for r in train])
        sims = emb @ emb.T
        np.fill_diagonal(sims, -np.inf)
        loo = 1 - sims.max(1)  # each training input against the others
        parts = [loo]
        if val:
            parts.append(1 - (encoder([r["input"] for r in val]) @ emb.T).max(1))
        mix, basis = None, f"{len(train):,} train + {len(val):,} validation inputs"
        if predict is not None and labels:
            rows = val if len(val) >= 100 else train
            counts = Counter(p.output for p in predict(rows))
            mix = {label: counts.get(label, 0) for label in labels}
            basis += f"; label mix of the specialist's answers on {len(rows):,} {'validation' if rows is val else 'train'} rows"
        return cls(emb, np.concatenate(parts), mix, basis)


def apart(fn, *args):
    """`fn(*args)` computed on a thread that ends with it. torch (like llama.cpp) computes with
    OpenMP, whose threads stay with the thread that started them: a second thread computing for
    the life of the server makes libgomp count more threads than cores and stop spinning
    between calls, the model's threads too (benchmarks/shadow_overhead.py --part drift-cost, a
    torch MiniLM specialist at concurrency 1, p50: 12.1 ms alone, 34.3 ms beside a drift watch
    computing on every core from a thread that stayed, 11.4 ms with its batches computed apart,
    on one core, at the lowest priority)."""
    with ThreadPoolExecutor(1, thread_name_prefix="protege-compute-apart") as one:  # its thread ends on exit
        return one.submit(fn, *args).result()


def reference_for_run(store, run_id: str, task, encoder, predict) -> tuple[Reference, str]:
    """The reference of what a trained run saw (its dataset), and that dataset's id."""
    from ..datasets.registry import get_dataset
    from ..runs.registry import get_run

    ds = get_dataset(store, get_run(store, run_id)["dataset_id"])
    labels = task.labels if task.kind == "classification" else None
    return Reference.build(ds, encoder, predict, labels), ds.id


class DriftWatch:
    """Collects served inputs and answers; tests them against the Reference."""

    def __init__(self, reference: Reference, encoder, *, window: int = 500, alpha: float = 1e-3, min_n: int = 100,
                 threshold: float | None = None, queue_max: int = 10_000, dataset_id: str | None = None):
        self.ref, self.encoder, self.dataset_id = reference, encoder, dataset_id
        self.alpha, self.min_n, self.threshold = alpha, min_n, threshold
        self.distances: deque = deque(maxlen=window)
        self.labels: deque = deque(maxlen=window)
        self.confidences: deque = deque(maxlen=window)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_max)
        self.skipped = 0
        """Inputs not embedded because the queue was full (counted, never blocking a request)."""
        self.observed = 0
        self.thread = threading.Thread(target=self._run, name="protege-serve-drift", daemon=True)
        self.thread.start()

    def observe(self, text: str, label: str | None, confidence: float | None) -> None:
        """Called after the client has its answer; never blocks."""
        self.labels.append(label)
        self.confidences.append(confidence)
        try:
            self.queue.put_nowait(text)
        except queue.Full:
            self.skipped += 1

    def _run(self) -> None:
        _yield_to_the_model()
        while True:
            batch = [self.queue.get()]
            if batch[0] is None:
                return
            while len(batch) < 64:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            try:
                d = 1 - (apart(self._embed, batch) @ self.ref.train_emb.T).max(1)
                self.distances.extend(float(x) for x in d)
                self.observed += len(batch)
            except Exception:  # an encoder failure must not stop serving: log and go on
                log.exception("protege serve: drift encoder failed on %d inputs", len(batch))

    def _embed(self, batch: list[str]):
        """The inputs embedded on one core: a torch encoder computing on several would start
        OpenMP threads beside the model's (see `apart`). torch's thread count is one setting
        for the threads it has not started computing in yet, so it is set back at once; the
        model's thread computed first (drift embeds inputs already answered) and keeps its own."""
        try:
            import torch
        except ImportError:
            return self.encoder(batch)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.encoder(batch)
        finally:
            torch.set_num_threads(before)

    def clear(self) -> None:
        """Start the windows afresh (after an alarm is reset)."""
        for w in (self.distances, self.labels, self.confidences):
            w.clear()

    def rebase(self, reference: Reference, dataset_id: str | None, threshold: float | None) -> None:
        """Test against another run's training data from now on (a new deployment took over)."""
        self.ref, self.dataset_id, self.threshold = reference, dataset_id, threshold
        self.clear()

    def idle(self) -> bool:
        return self.queue.empty()

    def status(self) -> dict:
        from scipy import stats

        d = list(self.distances)
        n = len(d)
        out: dict = {"reference": self.ref.basis, "window": n, "skipped": self.skipped, "alpha": self.alpha}
        beyond = sum(1 for x in d if x > self.ref.q95)
        p_in = float(stats.binom.sf(beyond - 1, n, 0.05)) if n >= self.min_n else None
        out["input"] = {"q95": self.ref.q95, "beyond_q95": beyond, "share": beyond / n if n else None,
                        "expected_share": 0.05, "p_value": p_in, "alarm": p_in is not None and p_in < self.alpha}
        labels = [x for x in self.labels if x is not None]
        if self.ref.label_counts and len(labels) >= self.min_n:
            # two samples, both finite: the window's answers and the reference's (chi-square of the 2 x K table)
            counts = Counter(labels)
            names = sorted(set(self.ref.label_counts) | set(counts))
            table = np.array([[counts.get(x, 0) for x in names], [self.ref.label_counts.get(x, 0) for x in names]])
            table = table[:, table.sum(0) > 0]
            chi2, p, dof, _ = stats.chi2_contingency(table)
            out["labels"] = {"chi2": float(chi2), "dof": int(dof), "p_value": float(p), "alarm": float(p) < self.alpha}
        else:
            out["labels"] = {"p_value": None, "alarm": False}
        conf = [c for c in self.confidences if c is not None]
        out["confidence"] = {"threshold": self.threshold, "mean": float(np.mean(conf)) if conf else None,
                             "under_threshold": (sum(1 for c in conf if c < self.threshold) / len(conf)
                                                 if conf and self.threshold is not None else None)}
        return out

    def metrics(self) -> list[str]:
        s = self.status()

        def num(x):
            return "NaN" if x is None else f"{x:.6g}"

        return ["# HELP protege_serve_drift_input_p_value One-sided p-value: served inputs beyond the reference's "
                "95th-percentile distance to the training inputs.",
                "# TYPE protege_serve_drift_input_p_value gauge",
                f"protege_serve_drift_input_p_value {num(s['input']['p_value'])}",
                f"protege_serve_drift_input_share_beyond_q95 {num(s['input']['share'])}",
                f"protege_serve_drift_labels_p_value {num(s['labels']['p_value'])}",
                f"protege_serve_drift_under_threshold_share {num(s['confidence']['under_threshold'])}",
                f"protege_serve_drift_alarm{{kind=\"input\"}} {int(s['input']['alarm'])}",
                f"protege_serve_drift_alarm{{kind=\"labels\"}} {int(s['labels']['alarm'])}",
                f"protege_serve_drift_window {s['window']}", f"protege_serve_drift_skipped_total {self.skipped}"]

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)


def _yield_to_the_model() -> None:
    """The calling thread (and the compute threads it starts) at the lowest CPU priority, so
    the drift encoder computes in the time the model leaves free. Linux gives each thread its
    own nice value; elsewhere this does nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
