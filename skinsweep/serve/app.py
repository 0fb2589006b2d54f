"""``skinsweep serve``: a bundle behind HTTP, on Ray Serve with a FastAPI ingress.

One deployment, ``skinsweep``, N replicas. Each replica loads and verifies the bundle once
(:func:`~skinsweep.ensemble.bundle.load_bundle` refuses a tampered one) and scores images with
dynamic batching: every uploaded image is one call of :meth:`SkinsweepService.score_one`, which
``serve.batch`` gathers, across concurrent requests, into batches of up to ``--max-batch`` images
for one forward pass (run in a worker thread, so the replica keeps accepting requests meanwhile).

Routes: ``GET /`` (the web page), ``POST /v1/predict``, ``GET /v1/info`` (the model card),
``GET /healthz``, and FastAPI's ``/docs`` + ``/openapi.json``. Every bad request gets a 4xx JSON body
``{"error": {"code", "message", "file"}}`` (:class:`~skinsweep.serve.service.RequestError`).
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request, str | None)
# through Serve's class wrapper, where string annotations do not resolve.
import asyncio
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from skinsweep.errors import ConfigError
from skinsweep.serve.service import Limits, RequestError, Scorer, Upload, display_name

APP_NAME = "skinsweep"
METADATA_FIELDS = ("age", "sex", "localization")
FORM_FIELDS = ("files", "explain", *METADATA_FIELDS)
TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``skinsweep serve`` takes. ``address``: join that Ray cluster (else start a local Ray)."""

    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    max_upload_mb: float = 20.0
    max_files: int = 64
    cpus_per_replica: float = 1.0
    address: str | None = None


_MULTIPART_DOC = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "One or more dermoscopic images (JPEG, PNG …); at most --max-files, each at "
                                     "most --max-upload-mb."},
            "age": {"type": "array", "items": {"type": "string"},
                    "description": "Per file, in file order (only for bundles that stack metadata; empty = unknown)."},
            "sex": {"type": "array", "items": {"type": "string", "enum": ["female", "male", "unknown", ""]}},
            "localization": {"type": "array", "items": {"type": "string"},
                             "description": "Anatomical site per file, as HAM10000's localization."},
            "explain": {"type": "boolean", "description": "Add a Grad-CAM heat map per member (as ?explain=true)."},
        }}}}},
    "responses": {"4XX": {"description": "Bad request: {\"error\": {\"code\", \"message\", \"file\"}}"}},
}

api = FastAPI(title="skinsweep", version="1",
              description="Melanoma-vs-benign scores for dermoscopic images from a skinsweep deployment bundle. "
                          "A research tool, not a diagnostic device.")


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@serve.deployment(name=APP_NAME, health_check_period_s=10)
@serve.ingress(api)
class SkinsweepService:
    """One replica: the bundle, loaded and verified once, and the routes."""

    def __init__(self, bundle_path: str, limits: dict, max_batch: int, batch_wait_ms: float) -> None:
        from skinsweep.ensemble.bundle import load_bundle

        self.scorer: Scorer | None = None
        self.limits = Limits(**limits)
        self.score_one.set_max_batch_size(max_batch)
        self.score_one.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        scorer = Scorer(load_bundle(bundle_path), limits=self.limits)
        self._warm_up(scorer)
        self.scorer = scorer
        self.page = resources.files("skinsweep.serve").joinpath("page.html").read_text(encoding="utf-8")

    @staticmethod
    def _warm_up(scorer: Scorer) -> None:
        """One forward pass on a blank image, so the first client does not pay for lazy initialisation."""
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (128, 96, 80)).save(buf, format="PNG")
        u = scorer.check_upload("warm-up", "image/png", buf.getvalue())
        if scorer.bundle.metadata_features:
            u.metadata = {f: "" for f in scorer.bundle.metadata_features}
        scorer.score([u])
        scorer.batches = scorer.images = 0  # /healthz counts clients' images only

    def check_health(self) -> None:  # Ray Serve restarts a replica whose check raises
        if self.scorer is None:
            raise RuntimeError("bundle not loaded")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def score_one(self, uploads: list[Upload]) -> list[dict]:
        """Dynamic batching: a list of uploads from any number of concurrent requests, one forward pass."""
        return await asyncio.to_thread(self.scorer.score, uploads)

    # ---- routes -------------------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page_route(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz", summary="Ready or not")
    def healthz(self) -> JSONResponse:
        if self.scorer is None:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse(self.scorer.health())

    @api.get("/v1/info", summary="The bundle's model card")
    def info(self) -> JSONResponse:
        return JSONResponse(self.scorer.info())

    @api.post("/v1/predict", summary="Score one or more images", openapi_extra=_MULTIPART_DOC)
    async def predict(self, request: Request, explain: str | None = None) -> JSONResponse:
        """Per image: member probabilities, ensemble and calibrated probability, decision at the bundle's
        threshold, the threshold and its rule, the bundle's name and hash; with ``explain=true`` also a
        Grad-CAM heat map per member (base64 PNG)."""
        try:
            uploads, want_explain = await self._read(request, explain)
            results = await asyncio.gather(*(self.score_one(u) for u in uploads))
            if want_explain:
                for res, maps in zip(results, await asyncio.to_thread(self.scorer.explain, uploads)):
                    res["heatmaps"] = maps
        except RequestError as e:
            return _error(e)
        return JSONResponse({"bundle": self.scorer.name, "bundle_hash": self.scorer.hash, "results": results})

    async def _read(self, request: Request, explain_query: str | None) -> tuple[list[Upload], bool]:
        """Parse and check the multipart body; RequestError for the first problem found."""
        lim = self.limits
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise RequestError(415, "unsupported_media_type", f"send multipart/form-data with the images as "
                               f"'files' fields (got content type {ctype.split(';')[0] or 'none'})")
        length = request.headers.get("content-length")
        budget = lim.max_files * lim.max_upload_bytes + 2**20  # every file at its limit, plus the form's own bytes
        if length and length.isdigit() and int(length) > budget:
            raise RequestError(413, "request_too_large", f"the request ({int(length) / 2**20:.1f} MB) is larger than "
                               f"{lim.max_files} files of {lim.max_upload_mb:g} MB")
        try:
            form = await request.form(max_files=lim.max_files, max_fields=1000, max_part_size=2**20)
        except Exception as e:  # noqa: BLE001 - Starlette's multipart errors (HTTPException, MultiPartException)
            detail = str(getattr(e, "detail", "") or e)
            if "too many files" in detail.lower():
                raise RequestError(413, "too_many_files", f"more than {lim.max_files} files in one request "
                                   "(--max-files); split them over several requests") from None
            raise RequestError(400, "bad_form", f"the multipart body could not be read: {detail[:200]}") from None
        try:
            unknown = sorted({k for k in form.keys() if k not in FORM_FIELDS})
            if unknown:
                raise RequestError(400, "unknown_field", f"unknown form field(s) {', '.join(unknown)}; this endpoint "
                                   f"takes {', '.join(FORM_FIELDS)}")
            files = form.getlist("files")
            if not files:
                raise RequestError(400, "no_files", "no images: send one or more image files as multipart "
                                   "field 'files'")
            if len(files) > lim.max_files:
                raise RequestError(413, "too_many_files", f"{len(files)} files in one request; the limit is "
                                   f"{lim.max_files} (--max-files)")
            flag = (explain_query if explain_query is not None else str(form.get("explain", ""))).strip().lower()
            if flag not in TRUE + FALSE:
                raise RequestError(400, "bad_field", f"explain={flag!r}: use true or false")
            uploads = []
            for k, f in enumerate(files):
                if isinstance(f, str):
                    raise RequestError(400, "not_a_file", f"field 'files' number {k + 1} is text, not a file upload")
                name = display_name(f.filename, k)
                data = await f.read(lim.max_upload_bytes + 1)  # never more than the limit into memory
                uploads.append(await asyncio.to_thread(self.scorer.check_upload, name, f.content_type, data))
            fields = {m: [str(v) for v in form.getlist(m)] for m in METADATA_FIELDS}
            for u, row in zip(uploads, self.scorer.metadata_rows([u.name for u in uploads], fields)):
                u.metadata = row
            return uploads, flag in TRUE
        finally:
            await form.close()  # Starlette spools large parts to its own temporary files: remove them now


# --------------------------------------------------------------------------------------------------
# Starting and stopping
# --------------------------------------------------------------------------------------------------
@dataclass
class Running:
    """A started service: its URL, and whether stopping it should also stop the Ray this process started."""

    url: str
    own_ray: bool
    config: ServeConfig


def check_config(cfg: ServeConfig) -> None:
    """The checks that fail in a second with one line, before Ray starts: bundle, limits, port."""
    from skinsweep.ensemble.bundle import verify_bundle

    if not Path(cfg.bundle).is_dir():
        raise ConfigError(f"{cfg.bundle}: no such bundle folder; build one with `skinsweep ensemble build`")
    verify_bundle(cfg.bundle)  # manifest and sha256 of every file (each replica verifies again as it loads)
    for name, value, lo in (("--replicas", cfg.replicas, 1), ("--max-batch", cfg.max_batch, 1),
                            ("--max-files", cfg.max_files, 1), ("--port", cfg.port, 1)):
        if value < lo:
            raise ConfigError(f"{name} {value}: must be at least {lo}")
    if cfg.port > 65535:
        raise ConfigError(f"--port {cfg.port}: must be at most 65535")
    if cfg.max_upload_mb <= 0 or cfg.cpus_per_replica <= 0:
        raise ConfigError("--max-upload-mb and --cpus-per-replica must be positive")
    if cfg.address is None:
        _check_port(cfg.host, cfg.port)


def _check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server uses the port?); "
                              "pick another with --port") from None


def start(cfg: ServeConfig, *, log: Callable[[str], None] = lambda m: None) -> Running:
    """Start (or join) Ray, start Serve's HTTP proxy on ``host:port`` and deploy the bundle; returns once
    every replica has loaded it. Stop with :func:`stop`."""
    import ray

    from skinsweep.sweep.runner import _connect_ray

    check_config(cfg)
    own_ray = not ray.is_initialized() and not (cfg.address or os.environ.get("RAY_ADDRESS"))
    log("starting Ray" if own_ray else f"joining Ray at {cfg.address or os.environ.get('RAY_ADDRESS')}")
    _connect_ray(cfg.address)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines would bury the service's own
    running = Running(url=f"http://{cfg.host}:{cfg.port}", own_ray=own_ray, config=cfg)
    deploying = False
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cfg.replicas * cfg.cpus_per_replica > cpus:  # else Serve would wait for them forever
            raise ConfigError(f"--replicas {cfg.replicas} × --cpus-per-replica {cfg.cpus_per_replica:g} needs "
                              f"{cfg.replicas * cfg.cpus_per_replica:g} CPUs; the Ray cluster has {cpus:g}: lower "
                              f"--cpus-per-replica (e.g. {cpus / cfg.replicas:.2g}) or --replicas")
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"log_level": "WARNING"})
        t0 = time.perf_counter()
        log(f"deploying {cfg.replicas} replica(s) of {cfg.bundle}")
        deploying = True
        deploy(cfg)
        log(f"ready in {time.perf_counter() - t0:.1f} s")
    except BaseException:
        if own_ray or deploying:  # never touch a joined cluster's other applications
            stop(running)
        raise
    return running


def deploy(cfg: ServeConfig, *, name: str = APP_NAME, route_prefix: str = "/") -> None:
    """Deploy (or replace) the application ``name`` at ``route_prefix`` on the running Serve instance;
    returns once every replica has loaded the bundle. A replica that cannot load it is a ConfigError."""
    limits = asdict(Limits(max_upload_mb=cfg.max_upload_mb, max_files=cfg.max_files))
    app = SkinsweepService.options(
        num_replicas=cfg.replicas, ray_actor_options={"num_cpus": cfg.cpus_per_replica},
        # every image of a full batch, and the requests queued behind it, may be in flight at once
        max_ongoing_requests=max(2 * cfg.max_batch, 16),
    ).bind(str(Path(cfg.bundle).resolve()), limits, cfg.max_batch, cfg.batch_wait_ms)
    try:
        serve.run(app, name=name, route_prefix=route_prefix)
    except RuntimeError as e:  # Serve's DeploymentFailed / "failed to deploy": the replica's own error is inside
        from skinsweep.errors import first_line

        raise ConfigError(f"the service did not start: {first_line(e)[:300]}") from None


def stop(running: Running) -> None:
    """Remove the application; shut Serve and Ray down when this process started them."""
    import ray

    if not ray.is_initialized():
        return
    try:
        if running.own_ray:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        if running.own_ray:
            ray.shutdown()
