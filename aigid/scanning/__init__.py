"""Scanning: score folders, archives and file lists into a results store (``local``), on one
machine or spread over a Ray cluster (``ray``, ``ray_stages``)."""
