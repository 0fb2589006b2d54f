"""``skinsweep export``: a bundle as one ONNX graph (:mod:`skinsweep.ensemble.export`).

Registered on :data:`skinsweep.cli.app` when imported (cli.py imports this module at its end).
Thin, like cli.py: the command parses options and calls one library function.
"""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from skinsweep.cli import app, err, out, user_errors


@app.command("export")
@user_errors
def export_cmd(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Deployment bundle folder (skinsweep ensemble build's bundle/)."),
    fmt: str = typer.Option("onnx", "--format", help="Export format: onnx (the only one)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder to write model.onnx, export.json and manifest.json to "
                                 "(new, empty, or an earlier export, which is replaced)."),
    opset: int = typer.Option(18, "--opset", min=18, help="ONNX opset version."),
) -> None:
    """Export a bundle as one ONNX graph (model.onnx + export.json) for runtimes without skinsweep.

    uint8 images (resized as the bundle does) in; member, ensemble and calibrated probabilities and the
    decision out. Checked with onnxruntime before it is reported.
    """
    from skinsweep.ensemble.export import MODEL_ONNX, export_bundle_onnx

    info = export_bundle_onnx(bundle, out_dir, fmt=fmt, opset=opset,
                              log=lambda m: err.print(m, highlight=False, markup=False, soft_wrap=True))
    say = functools.partial(out.print, highlight=False, markup=False, soft_wrap=True)
    say(f"exported bundle {bundle} (hash {info['bundle_hash']}): {len(info['members'])} member(s), combiner "
        f"{info['combiner']}, calibrator {info['calibrator']}, opset {info['opset']}")
    for i in info["inputs"]:
        shape = "(" + ", ".join(map(str, i["shape"])) + ")"
        extra = f" — {i['resize']['rule']}" if "resize" in i else f" — columns {', '.join(i['columns'])}"
        say(f"input  {i['name']}: {i['dtype']} {shape}{extra}")
    say(f"output {', '.join(o['name'] for o in info['outputs'])}; decision = calibrated_prob >= {info['threshold']:.4g}")
    exact = "" if info["exact_preprocessing"] else " (a member resizes in the graph: within 2 uint8 levels of the bundle)"
    say(f"onnxruntime vs the bundle's modules on random images: max |difference| {info['check']['max_abs_diff']:.2g}{exact}")
    size = (Path(out_dir) / MODEL_ONNX).stat().st_size / 2**20
    say(f"wrote {out_dir}/{MODEL_ONNX} ({size:,.1f} MiB), export.json, manifest.json")

