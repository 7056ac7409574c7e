"""Scoring inside a service: an in-process dynamic batcher (``batcher``), the HTTP server behind
``aigid serve`` (``http``, ``protocol``, ``metrics``) and a Ray Serve deployment (``ray_serve``),
all on one batch function (``scoring``)."""
