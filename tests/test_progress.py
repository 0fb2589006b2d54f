"""The sweep's progress view, driven by made-up trial events (no Ray, no terminal)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from skinsweep.sweep.progress import SweepProgress


def console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=200, color_system="standard" if terminal else None), buf


def run_events(p: SweepProgress) -> None:
    """Three trials: one completes, one is pruned at epoch 1, one crashes, is retried, and fails; one runs."""
    p.started("a", "tiny_resnet", "finetune", {"lr": 0.001, "pos_weight": 8.0}, epochs=3)
    p.started("b", "tiny_vit", "linear_probe", {"lr": 0.0123456, "backbone_args": {"input_size": 64}}, epochs=3)
    p.epoch("a", 1, 0.70)
    p.epoch("b", 1, 0.40)
    p.finished("b", "pruned", 0.40)
    p.epoch("a", 2, 0.80)
    p.epoch("a", 3, 0.75)
    p.finished("a", "completed", 0.80)
    p.started("c", "tiny_clip", "finetune", {"lr": 0.01}, epochs=3)
    p.retrying("c", 2, "RuntimeError: boom")
    p.started("c", "tiny_clip", "finetune", {"lr": 0.01}, epochs=3)
    p.finished("c", "failed")
    p.started("d", "tiny_vit", "finetune", {"lr": 0.002}, epochs=3)
    p.epoch("d", 1, 0.9)


def test_plain_lines_outside_a_terminal():
    con, buf = console(terminal=False)
    p = SweepProgress(con, name="s", total=5)
    assert not p.live  # not a terminal: no live table
    with p:
        run_events(p)
    lines = buf.getvalue().splitlines()
    assert "\x1b" not in buf.getvalue()
    # one line per trial event, none per epoch
    assert [ln.split()[0] for ln in lines] == ["[start]", "[start]", "[1/5]", "[2/5]", "[start]", "[retry]",
                                               "[start]", "[3/5]", "[start]"]
    assert lines[0] == "[start] a tiny_resnet finetune lr=0.001 pos_weight=8"
    assert lines[1] == "[start] b tiny_vit linear_probe lr=0.0123 backbone_args.input_size=64"
    assert lines[2] == ("[1/5] b PRUNED tiny_vit linear_probe lr=0.0123 backbone_args.input_size=64 · epoch 1/3 "
                        "val_auc 0.400 — running 1, completed 0, pruned 1")
    assert lines[3].startswith("[2/5] a COMPLETED tiny_resnet finetune lr=0.001 pos_weight=8 · epoch 3/3 val_auc 0.800")
    assert lines[3].endswith("best so far a (tiny_resnet, finetune) val_auc 0.800")
    assert lines[5] == "[retry] c crashed, attempt 2 next: RuntimeError: boom"
    assert lines[6] == "[start] c tiny_clip finetune lr=0.01 (attempt 2)"
    assert lines[7].startswith("[3/5] c FAILED tiny_clip finetune lr=0.01 — running 0, completed 1, pruned 1, failed 1")


def test_table_and_header():
    con, _ = console(terminal=False)
    p = SweepProgress(con, name="s", total=5, live=False)
    with p:
        run_events(p)
    assert p.header() == ("sweep s: 3/5 trials done · running 1, completed 1, pruned 1, failed 1; "
                          "best so far a (tiny_resnet, finetune) val_auc 0.800")
    out, buf = console(terminal=False)
    out.print(p.render())
    text = buf.getvalue()
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines()[2:] if ln.strip()}
    assert text.splitlines()[0] == p.header()
    assert text.splitlines()[1].split() == ["trial", "backbone", "mode", "hyperparameters", "status", "epoch",
                                            "val_auc", "last", "best"]
    # running trials first, then the most recently finished
    assert list(rows) == ["d", "c", "a", "b"]
    assert rows["d"][-4:] == ["RUNNING", "1/3", "0.900", "0.900"]
    assert rows["a"][-4:] == ["COMPLETED", "3/3", "0.750", "0.800"]  # latest epoch vs best epoch
    assert rows["b"][-4:] == ["PRUNED", "1/3", "0.400", "0.400"]
    assert rows["c"][-4:] == ["FAILED", "-", "-", "-"]


def test_live_table_on_a_terminal():
    con, buf = console(terminal=True)
    p = SweepProgress(con, name="s", total=5)
    assert p.live
    with p:
        run_events(p)
    out = buf.getvalue()
    assert "\x1b[" in out and "[start]" not in out  # a redrawn table, not plain lines
    assert "best so far a (tiny_resnet, finetune) val_auc 0.800" in out and "RETRYING" in out


@pytest.mark.parametrize("mode, best", [("max", "a"), ("min", "b")])
def test_best_so_far_follows_mode(mode, best):
    p = SweepProgress(console(False)[0], name="s", total=3, metric="val_loss", mode=mode, live=False)
    p.add_finished("a", "tiny_vit", "finetune", {}, "completed", 0.5)
    p.add_finished("b", "tiny_vit", "finetune", {}, "completed", 0.3)
    p.add_finished("c", "tiny_vit", "finetune", {}, "pruned", 0.1)  # pruned trials are never "best"
    assert p.best_row().trial_id == best


def test_rows_are_capped():
    p = SweepProgress(console(False)[0], name="s", total=40, live=False, max_rows=5)
    for k in range(12):
        p.add_finished(f"t{k}", "tiny_vit", "finetune", {}, "completed", k / 20)
    table = p.table()
    assert table.row_count == 5 and "+7 earlier trials" in table.caption


def test_a_failed_trial_restored_on_resume_shows_no_epoch() -> None:
    con, buf = console(False)
    p = SweepProgress(con, name="s", total=2, live=False)
    p.add_finished("a", "tiny_vit", "finetune", {}, "failed", None, epoch=float("nan"))  # epochs_run of a failed row
    p.add_finished("b", "tiny_vit", "finetune", {}, "completed", 0.7, epoch=4.0)
    assert p.rows["a"].epoch is None and p.rows["b"].epoch == 4
    p.finished("a", "failed", None, epoch=float("nan"))
    assert "nan" not in buf.getvalue()


def test_mirror_status_under_the_header_on_a_terminal_and_as_lines_elsewhere():
    """The object-store mirror falling behind: on a terminal a line under the header (gone once it has caught
    up); outside one, the lines the mirror sends, as they come."""
    status = ["mirror: s3://b/p/s unreachable (Could not connect to server), 3 files waiting, retry in 8 s"]
    con, buf = console(terminal=True)
    p = SweepProgress(con, name="s", total=2)
    p.mirror_status = lambda: status[0]
    with p:
        p.started("a", "tiny_resnet", "finetune", {"lr": 0.001}, epochs=3)
        p.note(status[0])  # not printed on a terminal: the live view shows the status instead
        lines = [str(x) for x in p.render().renderables[:2]]
        assert lines == [p.header(), status[0]]
        status[0] = ""
        assert len(p.render().renderables) == 2  # header and table: nothing about the mirror once it keeps up
    assert buf.getvalue().count("retry in 8 s") == 1  # drawn once, in the live view
    con, buf = console(terminal=False)
    p = SweepProgress(con, name="s", total=2)
    with p:
        p.note("mirror: s3://b/p/s reachable again; the mirror has caught up")
    assert buf.getvalue() == "mirror: s3://b/p/s reachable again; the mirror has caught up\n"
