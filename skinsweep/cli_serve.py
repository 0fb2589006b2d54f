"""``skinsweep serve``: a deployment bundle over HTTP (Ray Serve + FastAPI), with a web page at ``/``."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from skinsweep.cli import app, err, out, user_errors


@app.command("serve")
@user_errors
def serve_cmd(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Deployment bundle folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="HTTP port."),
    replicas: int = typer.Option(1, "--replicas", help="Replicas, each with its own copy of the bundle."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most images one replica scores in one forward pass "
                                  "(dynamic batching across concurrent requests; 1 turns batching off)."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", help="How long a replica waits to fill a batch."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest accepted image file, in MB."),
    max_files: int = typer.Option(64, "--max-files", help="Most images in one request."),
    cpus_per_replica: float = typer.Option(1.0, "--cpus-per-replica", help="CPUs Ray reserves for each replica."),
    address: Optional[str] = typer.Option(None, "--address", help="Join a Ray cluster (HEAD:6379); BUNDLE must "
                                          "then be readable at the same path on the nodes (default: RAY_ADDRESS, "
                                          "else a local Ray)."),
) -> None:
    """Serve a bundle over HTTP: POST /v1/predict, GET /v1/info (model card), GET /healthz, /docs, and a page at /."""
    from skinsweep.serve.app import ServeConfig, start, stop

    cfg = ServeConfig(bundle=bundle, host=host, port=port, replicas=replicas, max_batch=max_batch,
                      batch_wait_ms=batch_wait_ms, max_upload_mb=max_upload_mb, max_files=max_files,
                      cpus_per_replica=cpus_per_replica, address=address)
    running = start(cfg, log=lambda m: err.print(m, highlight=False, markup=False))
    try:
        out.print(f"serving {bundle} at {running.url}/ (API: {running.url}/docs); Ctrl-C to stop",
                  highlight=False, markup=False)
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())  # `kill` stops it as cleanly as Ctrl-C
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        err.print("stopping", highlight=False, markup=False)
        stop(running)
