"""The naive way to serve a detector, for comparison with ``aigid serve``: one
``detector.predict([image])`` per request on Starlette's thread pool, no batching, no queue bound.

    python benchmarks/_naive_server.py DETECTOR PORT
"""
from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aigid.models.registry import load_detector


def main(folder: str, port: int) -> None:
    detector = load_detector(folder)

    async def score(request: Request) -> JSONResponse:
        body = await request.body()
        p = await run_in_threadpool(lambda: float(detector.predict([body])[0]))
        return JSONResponse({"results": [{"p_fake": p}]})

    app = Starlette(routes=[Route("/v1/score", score, methods=["POST"])])
    print("ready", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
