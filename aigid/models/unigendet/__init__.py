"""UniGenDet: BAGEL's MoT backbone, SigLIP, flow matching, release loading, and the detector.

Layers inside the package point down: ``rope`` ← ``mot``; ``siglip``, ``flow``, ``tokenizer``,
``sampling``, ``modules`` stand alone; ``config`` ← ``release`` ← ``model``.
"""
from aigid.models.unigendet.config import UniGenDetConfig
from aigid.models.unigendet.decode import parse_verdict
from aigid.models.unigendet.inputs import DetInputs, GenInputs, Generated, PackOutput
from aigid.models.unigendet.model import (FAKE_CLASS, REAL_CLASS, UniGenDet, detection_loss,
                                          fake_label_to_class)
from aigid.models.unigendet.modules import patchify_latents, sincos_2d, unpatchify_latents

__all__ = ["UniGenDetConfig", "UniGenDet", "DetInputs", "GenInputs", "PackOutput", "Generated",
           "FAKE_CLASS", "REAL_CLASS", "fake_label_to_class", "detection_loss", "patchify_latents",
           "unpatchify_latents", "sincos_2d", "parse_verdict"]
