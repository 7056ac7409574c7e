"""Generator fingerprints the tools themselves write: PNG text chunks and EXIF software names.

What each tool writes (read from their code; the keys are conventions, not a standard):

- Stable Diffusion web UI (AUTOMATIC1111) and Forge: text ``parameters`` = "prompt\\nNegative
  prompt: ...\\nSteps: 20, Sampler: ..., Model: name, Version: v1.x" (``modules/images.py``);
  in JPEG/WebP the same text goes to EXIF ``UserComment``. Forge's versions start with "f".
- ComfyUI: text ``prompt`` (the API graph, JSON) and ``workflow`` (the editor graph, JSON)
  (``nodes.py`` SaveImage).
- NovelAI: ``Software`` = "NovelAI", ``Source`` = the model, ``Comment`` = JSON settings.
- InvokeAI: ``invokeai_metadata`` / ``invokeai_graph`` (3.x+), ``sd-metadata`` and ``Dream`` (2.x).

Text is decoded only for the keys read here, at most ``MAX_TEXT`` bytes (decompressed with the
same cap); a ComfyUI workflow of megabytes is recognised by its key alone.
"""
from __future__ import annotations

import re
import zlib
from typing import Optional

from aigid.provenance.containers import EvidenceError, Segment

__all__ = ["MAX_TEXT", "KNOWN_NAMES", "known_generator", "png_text", "from_png_text",
           "from_exif"]

MAX_TEXT = 64 << 10  # bytes of a text chunk decoded (generation parameters are < 10 kB)

# Substrings (lower case) of a Software/Make/Model/CreatorTool value -> the generator's name.
# Only names no camera or photo editor uses: "Photoshop" alone is not AI, "Firefly" is.
KNOWN_NAMES: tuple[tuple[str, str], ...] = (
    ("novelai", "NovelAI"), ("midjourney", "Midjourney"), ("dall-e", "DALL-E"),
    ("dall·e", "DALL-E"), ("firefly", "Adobe Firefly"), ("stable diffusion", "Stable Diffusion"),
    ("stablediffusion", "Stable Diffusion"), ("comfyui", "ComfyUI"),
    ("automatic1111", "AUTOMATIC1111"), ("invokeai", "InvokeAI"), ("fooocus", "Fooocus"),
    ("ideogram", "Ideogram"), ("leonardo.ai", "Leonardo.Ai"), ("dreamstudio", "DreamStudio"),
    ("bing image creator", "Bing Image Creator"),
)
_WANTED = {"parameters", "prompt", "workflow", "Software", "Source", "Comment",
           "invokeai_metadata", "invokeai_graph", "sd-metadata", "Dream", "XML:com.adobe.xmp"}
_PRESENCE_ONLY = {"workflow", "invokeai_graph"}  # may be megabytes: the key is the evidence
_A1111_FIELD = re.compile(r"(?:^|,\s*)(Model|Version):\s*([^,\n]{1,200})")


def known_generator(value: Optional[str]) -> Optional[str]:
    """The generator a Software/Make/CreatorTool value names, or None."""
    if not value:
        return None
    low = value.lower()
    return next((name for needle, name in KNOWN_NAMES if needle in low), None)


def _inflate(data: memoryview | bytes, where: str) -> bytes:
    """The first ``MAX_TEXT`` bytes of a zlib stream (the rest is never inflated)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_TEXT)
    except zlib.error as err:
        raise EvidenceError(f"{where}: compressed text does not inflate ({err})") from None
    return out


def png_text(segments: list[Segment]) -> dict[str, str]:
    """keyword -> text (first ``MAX_TEXT`` bytes) of the tEXt/zTXt/iTXt chunks whose keyword
    is one read here; ``""`` for presence-only keys (PNG spec 11.3.4)."""
    out: dict[str, str] = {}
    for seg in segments:
        if seg.kind not in ("text", "ztext", "itext"):
            continue
        head = bytes(seg.data[:80])
        end = head.find(b"\x00")
        if not 1 <= end <= 79:
            raise EvidenceError(f"{seg.where}: text chunk without a 1-79 byte keyword")
        key = head[:end].decode("latin-1")
        if key not in _WANTED or key in out:
            continue
        if key in _PRESENCE_ONLY:
            out[key] = ""
            continue
        body = seg.data[end + 1:]
        if seg.kind == "text":
            out[key] = bytes(body[:MAX_TEXT]).decode("latin-1")
        elif seg.kind == "ztext":
            out[key] = _inflate(body[1:], seg.where).decode("latin-1")
        else:  # iTXt: flag (1), method (1), language\0, translated keyword\0, UTF-8 text
            if len(body) < 2:
                raise EvidenceError(f"{seg.where}: iTXt chunk {key!r} cut short")
            compressed, rest = body[0], bytes(body[2:2 + MAX_TEXT + 600])
            parts = rest.split(b"\x00", 2)
            if len(parts) < 3:
                raise EvidenceError(f"{seg.where}: iTXt chunk {key!r} is malformed")
            if key == "XML:com.adobe.xmp":  # read whole, under the XMP cap, by the caller
                continue
            text = _inflate(parts[2], seg.where) if compressed else parts[2][:MAX_TEXT]
            out[key] = text.decode("utf-8", "replace")
    return out


def _a1111(text: str, where: str) -> dict:
    found = {"name": "AUTOMATIC1111/Forge", "in": where}
    for field, value in _A1111_FIELD.findall(text):
        found[field.lower()] = value.strip()
    if found.get("version", "").startswith("f"):
        found["name"] = "Forge"
    return found


def from_png_text(text: dict[str, str]) -> list[dict]:
    """The generators that ``png_text``'s keys and values name."""
    found: list[dict] = []
    if "parameters" in text:  # the SD web UIs' key; "Steps:" marks A1111's own format
        item = _a1111(text["parameters"], "png:parameters")
        if "Steps:" not in text["parameters"]:
            item["name"] = "Stable Diffusion web UI"
        found.append(item)
    if "workflow" in text or text.get("prompt", "").lstrip().startswith("{"):
        found.append({"name": "ComfyUI", "in": "png:" + ("prompt" if "prompt" in text
                                                        else "workflow")})
    if text.get("Software", "").strip() == "NovelAI" or (
            "Comment" in text and known_generator(text.get("Software")) == "NovelAI"):
        item = {"name": "NovelAI", "in": "png:Software"}
        if text.get("Source"):
            item["model"] = text["Source"].strip()[:200]
        found.append(item)
    elif (name := known_generator(text.get("Software"))) is not None:
        found.append({"name": name, "in": "png:Software"})
    invoke = [k for k in ("invokeai_metadata", "invokeai_graph", "sd-metadata", "Dream")
              if k in text]
    if invoke:
        found.append({"name": "InvokeAI", "in": "png:" + invoke[0]})
    return found


def from_exif(tags: dict[str, str], where: str) -> list[dict]:
    """Generators named by EXIF Software/Make/Model, or SD web UI parameters in UserComment."""
    found: list[dict] = []
    for field in ("software", "make", "model"):
        if (name := known_generator(tags.get(field))) is not None:
            found.append({"name": name, "in": f"{where}:{field}"})
            break
    comment = tags.get("user_comment", "")
    if "Steps:" in comment and "Sampler:" in comment:
        found.append(_a1111(comment, f"{where}:user_comment"))
    return found
