"""The HTTP server: OpenAI-style endpoints over the runtime, on one machine or on Ray Serve.

    llada-edge serve --model build/engines-tiny            # http://127.0.0.1:8000
    llada-edge serve --model BUILD --ray --replicas 2      # the same app, 2 Ray Serve replicas

* ``config``: :class:`ServeConfig`, what a server is started with (the CLI's flags);
* ``scheduler``: a bounded queue of requests over worker threads, each owning its pipeline;
* ``schemas``: the request bodies and their translation into the runtime's typed requests;
* ``files``: what a request may read (data URLs, allowed folders) and write (the output folder);
* ``metrics``: Prometheus counters and histograms; ``app``: the FastAPI app; ``ray_app``: the Ray Serve form.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client, python-multipart; Ray Serve for ``--ray``).
"""

from llada_edge.serve.config import ServeConfig

__all__ = ["ServeConfig"]
