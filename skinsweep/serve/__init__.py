"""The HTTP service (``skinsweep serve``): a deployment bundle on Ray Serve behind FastAPI, and its web page.

``service.py`` checks, scores and explains uploads (no Ray, no HTTP); ``app.py`` is the Ray Serve
deployment with its routes, and :func:`~skinsweep.serve.app.start` / :func:`~skinsweep.serve.app.stop`;
``page.html`` is the page served at ``/``. Importing this package imports neither Ray nor FastAPI.
"""
