"""MiraGe: frozen open_clip towers with MaPLe-style deep prompts, a memory bank, the detector."""
from aigid.models.mirage.model import BACKBONE_FILE, CONFIG_FILE, WEIGHTS_FILE, MiraGe, MiraGeConfig

__all__ = ["MiraGe", "MiraGeConfig", "CONFIG_FILE", "WEIGHTS_FILE", "BACKBONE_FILE"]
