"""Provenance evidence: what an image file declares about its origin (C2PA, IPTC XMP, generator
metadata), read from the bytes without decoding pixels. It stands beside a detector's score and
never changes it. See ``evidence`` for the summary rules."""
from aigid.provenance.evidence import (DECLARED_AI, DECLARED_CAMERA, NONE, evidence_json,
                                       provenance_of, read_evidence)

__all__ = ["read_evidence", "evidence_json", "provenance_of", "DECLARED_AI", "DECLARED_CAMERA",
           "NONE"]
