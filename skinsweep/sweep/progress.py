"""The sweep's progress view: a live table on a terminal, one plain line per trial event elsewhere.

On a terminal, :class:`SweepProgress` keeps a ``rich.live.Live`` table of the trials — id, backbone, mode,
key hyperparameters, status (RUNNING / COMPLETED / PRUNED / OUT_OF_BUDGET / DIVERGED / FAILED / RETRYING), epoch, the
scheduler metric at the latest epoch and the best so far — under a header line with the counts and the
best trial so far. Outside a terminal (CI logs, pipes, ``| tee``) there are no escape codes: each trial
start, retry and end prints one plain line with the same counts.

It knows nothing of Ray: the sweep's Tune callback feeds it events (:meth:`SweepProgress.started`,
:meth:`epoch`, :meth:`retrying`, :meth:`finished`), so tests can drive it with made-up events.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {"RUNNING": "cyan", "RETRYING": "yellow", "COMPLETED": "green", "PRUNED": "yellow",
                "OUT_OF_BUDGET": "blue", "DIVERGED": "magenta", "FAILED": "red"}  # in the order counts are shown
FINAL = ("COMPLETED", "PRUNED", "OUT_OF_BUDGET", "DIVERGED", "FAILED")


@dataclass
class TrialRow:
    trial_id: str
    backbone: str
    mode: str
    hparams: dict[str, Any]
    epochs: int | None = None
    status: str = "RUNNING"
    epoch: int | None = None
    latest: float | None = None
    best: float | None = None
    final: float | None = None  # the metric at the selected epoch, as recorded in trials.parquet
    attempt: int = 1
    seq: int = 0                # order of the last event, for "most recent first"


class SweepProgress:
    """Trial events in, a live table (terminal) or plain lines (anything else) out.

    Args:
        console: where to draw; ``console.is_terminal`` picks the live table unless ``live`` says otherwise.
        name: the sweep's name (header).
        total: trials the sweep will run (``num_samples``).
        metric: the reported metric shown per epoch and used for "best so far" (e.g. ``val_auc``).
        mode: ``"max"`` or ``"min"``: which way is better for ``metric``.
        max_rows: rows of the live table; running trials first, then the most recently finished.
        budget: the sweep's time budget (:class:`skinsweep.sweep.driver.Budget`): used and left are shown
            (nothing when it has none).
    """

    def __init__(self, console: Console, *, name: str, total: int, metric: str = "val_auc", mode: str = "max",
                 live: bool | None = None, max_rows: int = 25, budget=None) -> None:
        self.console, self.name, self.total = console, name, total
        self.budget = budget  # a skinsweep.sweep.driver.Budget (its .text() is shown), or None
        self.metric, self.mode, self.max_rows = metric, mode, max_rows
        self.live = console.is_terminal if live is None else live
        self.rows: dict[str, TrialRow] = {}
        # a callable giving one line about the object-store mirror while it lags ('' otherwise); set by the driver
        self.mirror_status = None
        self._seq = 0
        self._live: Live | None = None

    # ---- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> "SweepProgress":
        if self.live:
            self._live = Live(self.render(), console=self.console, auto_refresh=False, transient=False,
                              redirect_stdout=True, redirect_stderr=True)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._refresh()
            self._live.stop()
            self._live = None

    # ---- events -----------------------------------------------------------------------------------
    def add_finished(self, trial_id: str, backbone: str, mode: str, hparams: dict, status: str,
                     value: float | None, epoch: int | None = None) -> None:
        """A trial that ended before this view started (already in the results store on ``--resume``)."""
        row = TrialRow(trial_id, backbone, mode, hparams, status=status.upper(), epoch=_epoch(epoch))
        row.final = row.best = _num(value)
        self.rows[trial_id] = row
        self._touch(row)

    def started(self, trial_id: str, backbone: str, mode: str, hparams: dict, epochs: int | None = None) -> None:
        row = self.rows.get(trial_id)
        if row is None or row.status in FINAL:
            row = self.rows[trial_id] = TrialRow(trial_id, backbone, mode, dict(hparams), epochs=epochs)
        row.status = "RUNNING"
        self._touch(row)
        self._emit(f"[start] {self._label(row)}" + (f" (attempt {row.attempt})" if row.attempt > 1 else ""))

    def epoch(self, trial_id: str, epoch: int, value: float | None) -> None:
        row = self.rows.get(trial_id)
        if row is None:
            return
        row.epoch, row.latest = int(epoch), _num(value)
        if row.latest is not None and (row.best is None or self._better(row.latest, row.best)):
            row.best = row.latest
        self._touch(row)
        self._refresh()  # no plain line per epoch: one line per trial event keeps CI logs readable

    def retrying(self, trial_id: str, attempt: int, error: str = "") -> None:
        row = self.rows.get(trial_id)
        if row is None:
            return
        row.status, row.attempt = "RETRYING", int(attempt)
        self._touch(row)
        self._emit(f"[retry] {row.trial_id} crashed, attempt {row.attempt} next" + (f": {error}" if error else ""))

    def finished(self, trial_id: str, status: str, value: float | None = None, epoch: int | None = None) -> None:
        """A trial ended; ``status`` is what the results store recorded (completed, pruned, out_of_budget, diverged, failed),
        ``epoch`` the epochs it ran (a trial's last epoch comes only with its final report)."""
        row = self.rows.get(trial_id)
        if row is None:  # ended without a start event this session (restored by --resume)
            row = self.rows[trial_id] = TrialRow(trial_id, "?", "?", {})
        row.status, row.final = status.upper(), _num(value)
        if _epoch(epoch) is not None:
            row.epoch = _epoch(epoch)
        if row.final is not None and row.status != "FAILED" and (row.best is None or self._better(row.final, row.best)):
            row.best = row.final
        self._touch(row)
        value_text = f" {self.metric} {row.final:.3f}" if row.final is not None else ""
        self._emit(f"[{self.done()}/{self.total}] {row.trial_id} {row.status} {self._label(row, ids=False)}"
                   f"{self._epoch_text(row, ' · epoch ')}{value_text} — {self.summary()}{self._budget_text()}")

    def note(self, line: str) -> None:
        """A line about the sweep rather than one trial (the object-store mirror falling behind or catching up):
        printed as is outside a terminal; on a terminal the live view shows :attr:`mirror_status` under the
        header instead. Safe to call from another thread (the background mirror)."""
        if self._live is None:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    # ---- rendering --------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return dict.fromkeys(STATUS_STYLE, 0) | Counter(r.status for r in self.rows.values())

    def best_row(self) -> TrialRow | None:
        done = [r for r in self.rows.values() if r.status == "COMPLETED" and r.final is not None]
        pick = max if self.mode == "max" else min
        return pick(done, key=lambda r: r.final, default=None)

    def summary(self) -> str:
        """``running 2, completed 3, pruned 1`` + ``; best so far <id> (<backbone>, <mode>) <metric> 0.853``."""
        counts = self.counts()
        text = ", ".join(f"{s.lower()} {n}" for s, n in counts.items() if n or s in ("RUNNING", "COMPLETED"))
        best = self.best_row()
        if best is not None:
            text += f"; best so far {best.trial_id} ({best.backbone}, {best.mode}) {self.metric} {best.final:.3f}"
        return text

    def done(self) -> int:
        """Trials that have ended (completed, pruned, out_of_budget, diverged or failed)."""
        return sum(r.status in FINAL for r in self.rows.values())

    def header(self) -> str:
        return f"sweep {self.name}: {self.done()}/{self.total} trials done · {self.summary()}{self._budget_text()}"

    def table(self) -> Table:
        t = Table(box=None, pad_edge=False, header_style="bold")
        for col, kw in (("trial", {}), ("backbone", {}), ("mode", {}), ("hyperparameters", {"overflow": "fold"}),
                        ("status", {}), ("epoch", {"justify": "right"}),
                        (f"{self.metric} last", {"justify": "right"}), ("best", {"justify": "right"})):
            t.add_column(col, **kw)
        rows = sorted(self.rows.values(), key=lambda r: (r.status in FINAL, -r.seq))
        for r in rows[:self.max_rows]:
            t.add_row(r.trial_id, r.backbone, r.mode, _hparams(r.hparams),
                      Text(r.status, style=STATUS_STYLE.get(r.status, "")), self._epoch_text(r) or "-",
                      _fmt(r.latest), _fmt(r.best))
        if len(rows) > self.max_rows:
            t.caption = f"+{len(rows) - self.max_rows} earlier trials not shown (all are in trials.parquet)"
        return t

    def render(self) -> Group:
        mirror = self.mirror_status() if self.mirror_status is not None else ""
        return Group(Text(self.header(), style="bold"), *([Text(mirror, style="yellow")] if mirror else []),
                     self.table())

    # ---- internals --------------------------------------------------------------------------------
    def _budget_text(self) -> str:
        text = self.budget.text() if self.budget is not None else ""
        return f" · {text}" if text else ""

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def _touch(self, row: TrialRow) -> None:
        self._seq += 1
        row.seq = self._seq

    def _emit(self, line: str) -> None:
        if self._live is not None:
            self._refresh()
        else:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self.render(), refresh=True)

    def _label(self, row: TrialRow, ids: bool = True) -> str:
        hp = _hparams(row.hparams)
        return " ".join(p for p in ((row.trial_id if ids else ""), row.backbone, row.mode, hp) if p)

    @staticmethod
    def _epoch_text(row: TrialRow, prefix: str = "") -> str:
        if row.epoch is None:
            return ""
        return f"{prefix}{row.epoch}" + (f"/{row.epochs}" if row.epochs else "")


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _epoch(v: Any) -> int | None:
    """An epoch count from the store, or None when there is none (a failed trial's ``epochs_run`` is NaN)."""
    f = _num(v)
    return None if f is None else int(f)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _hparams(params: dict[str, Any], prefix: str = "") -> str:
    """``lr=0.00123 pos_weight=8 backbone_args.input_size=64`` (numbers to 3 significant digits)."""
    parts = []
    for k, v in params.items():
        if isinstance(v, dict):
            inner = _hparams(v, f"{prefix}{k}.")
            parts += [inner] if inner else []
        elif isinstance(v, float):
            parts.append(f"{prefix}{k}={v:.3g}")
        elif v is not None:
            parts.append(f"{prefix}{k}={v}")
    return " ".join(parts)
