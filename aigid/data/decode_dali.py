"""The DALI decode path: NVIDIA DALI decodes JPEGs (on the GPU, or on the CPU without one);
everything else goes to the PIL path.

Routing (``dali_eligible``) sniffs the bytes, never the file name: only a well-formed baseline,
extended or progressive 8-bit JPEG with 1 or 3 components (no CMYK/YCCK, no Adobe RGB transform,
no EXIF rotation, ending with its EOI marker, within PIL's pixel limit) goes to DALI. PNG, WebP,
GIF, CMYK, 16-bit, rotated, truncated or odd JPEGs are decoded by PIL in the workers, which is
what ``predict`` uses, so results agree with it. A DALI batch that fails is decoded again by
PIL; an image that fails both is an error record.

The pipeline: ``fn.external_source`` (encoded bytes) -> ``fn.decoders.image(output_type=RGB)``
(``device="mixed"`` on CUDA, ``"cpu"`` elsewhere) -> ``fn.resize`` (shorter side, or squash to
S x S; same interpolation family as the PIL path, antialiased) -> ``fn.crop_mirror_normalize``
(centre S x S crop, mean/std x 255, float CHW) -> copied into a torch tensor with
``feed_ndarray``. A CPU pipeline has ``device_id=None``, so it runs where no GPU (or no CUDA
driver) exists. DALI is imported lazily: this module imports and routes without it.

Provenance evidence is read by the CPU worker from the encoded bytes before they are routed here
(``Meta.evidence``); every path below keeps each image's ``Meta`` whole, so a DALI-decoded image, a
PIL-fallback one and an error record all carry it.

``iter_dali`` runs the DALI decode in a background thread with a bounded queue (``prefetch``
batches ahead), so decoding batch k+1 overlaps the model's work on batch k.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

from aigid.data.decode_cpu import Chunk, Meta, decode_image
from aigid.data.images import ImageError
from aigid.data.jpeg_markers import JpegStructureError, segments
from aigid.data.sources import image_format
from aigid.data.transforms import eval_transform

__all__ = ["JpegInfo", "jpeg_info", "sniff", "dali_eligible", "DaliDecoder", "DaliFailure",
           "iter_dali"]

_SOF_DALI = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman)
_SOF_ALL = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4 DHT, C8 reserved, CC DAC


class JpegInfo(NamedTuple):
    sof: int  # frame marker (0xC0 baseline, 0xC2 progressive, ...)
    precision: int
    height: int
    width: int
    components: int
    orientation: int  # EXIF orientation, 1 when absent; 0 when the EXIF block is unreadable
    adobe_transform: Optional[int]  # APP14 "Adobe" colour transform flag, None when absent


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag of IFD0 in an EXIF TIFF block: 1 when absent, 0 when malformed."""
    if len(tiff) < 8 or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return 0
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 0
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    for k in range(count):
        at = ifd + 2 + 12 * k
        if at + 12 > len(tiff):
            return 0
        if int.from_bytes(tiff[at:at + 2], order) == 0x0112:
            return int.from_bytes(tiff[at + 8:at + 10], order)
    return 1


def jpeg_info(data: bytes) -> Optional[JpegInfo]:
    """Parse the markers up to the frame header; ``None`` if this is not a readable JPEG."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    orientation, adobe = 1, None
    try:
        for marker, _, segment in segments(data):
            if marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
                orientation = _exif_orientation(segment[6:])
            elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
                adobe = segment[11]
            elif marker in _SOF_ALL:
                if len(segment) < 6:
                    return None
                return JpegInfo(marker, segment[0], int.from_bytes(segment[1:3], "big"),
                                int.from_bytes(segment[3:5], "big"), segment[5], orientation,
                                adobe)
    except JpegStructureError:
        return None
    return None  # a scan (or the end) before any frame header


def sniff(data: bytes) -> str:
    """The format from magic bytes (``aigid.data.sources.image_format``'s names, or "jp2"), else
    "unknown"."""
    if data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or data[:4] == b"\xff\x4f\xff\x51":
        return "jp2"
    return image_format(data) or "unknown"


def dali_eligible(data: bytes) -> bool:
    """Whether DALI should decode these bytes (see the module docstring); else the CPU path."""
    info = jpeg_info(data)
    if info is None or info.sof not in _SOF_DALI or info.precision != 8:
        return False
    if info.components not in (1, 3) or info.orientation != 1:
        return False
    if info.components == 3 and info.adobe_transform == 0:  # RGB-coded, not YCbCr
        return False
    pixels = info.height * info.width
    if pixels == 0 or (Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS):
        return False  # let PIL refuse it (bomb) so both paths give the same answer
    return data.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")  # truncated files: PIL reports them


class DaliFailure(RuntimeError):
    """A DALI batch that could not be decoded (its images go to the CPU path)."""


class DaliDecoder:
    """Decode a list of encoded JPEGs to a preprocessed (n, 3, S, S) float tensor on ``device``.

    On a CUDA device DALI decodes with nvJPEG (``"mixed"``: parsing on the CPU, decoding on the
    GPU); on any other device the whole pipeline runs on the CPU with ``threads`` threads.
    """

    def __init__(self, preprocess: dict[str, Any], batch_size: int,
                 device: torch.device | str = "cpu", threads: int = 4,
                 dtype: torch.dtype = torch.float32):
        self.pp, self.batch_size, self.threads = dict(preprocess), batch_size, threads
        self.dtype, self.device = dtype, torch.device(device)
        self.cuda = self.device.type == "cuda"
        # device_id=None: a CPU-only pipeline, which DALI builds without touching CUDA
        self.device_id = ((self.device.index if self.device.index is not None
                           else torch.cuda.current_device()) if self.cuda else None)
        self.pipe = self._build()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types  # lazy: DALI is optional

        size, mode = int(self.pp["size"]), self.pp.get("resize_mode", "shortest")
        interp = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR,
                  "nearest": types.INTERP_NN}[self.pp.get("interpolation", "bicubic")]
        antialias = interp != types.INTERP_NN  # DALI has no antialiased nearest
        mean = [255.0 * float(m) for m in self.pp["mean"]]
        std = [255.0 * float(s) for s in self.pp["std"]]
        if mode not in ("shortest", "squash"):
            raise ValueError(f"unsupported resize_mode {mode!r} (shortest or squash)")

        decode_on = "mixed" if self.cuda else "cpu"

        # Synchronous execution: we feed one batch and run it; our own thread does the prefetch.
        # The output window of each image is fed in as an input-space ROI (see ``_roi``), so the
        # resize lands exactly on the pixels torchvision's Resize + CenterCrop would keep.
        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=self.device_id, exec_async=False, exec_pipelined=False)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            images = fn.decoders.image(encoded, device=decode_on, output_type=types.RGB)
            images = fn.resize(images, size=(size, size), roi_start=roi_start, roi_end=roi_end,
                               interp_type=interp, antialias=antialias)
            return fn.crop_mirror_normalize(images, mean=mean, std=std, dtype=types.FLOAT,
                                            output_layout="CHW")

        built = pipe()
        built.build()
        return built

    def _roi(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """The input region, (y, x) start and end, that becomes the S x S output.

        ``shortest`` follows torchvision: Resize(S) gives the short side S and the long side
        ``int(S * long / short)``; CenterCrop(S) starts at ``int(round((long' - S) / 2))``. Mapping
        that window back to the input keeps the sampling positions and the filter's scale, and
        leaves no sub-pixel offset (DALI's own ``resize_shorter`` + ``crop_pos=0.5`` does not
        round the same way: up to half a pixel off, a large error at small S).
        """
        info = jpeg_info(data)
        if info is None or not info.height or not info.width:
            raise DaliFailure("not a JPEG whose size can be read")
        h, w, size = info.height, info.width, int(self.pp["size"])
        if self.pp.get("resize_mode", "shortest") == "squash":
            return np.zeros(2, np.float32), np.array([h, w], np.float32)
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        out_h, out_w = (size, new_long) if h <= w else (new_long, size)
        top, left = int(round((out_h - size) / 2.0)), int(round((out_w - size) / 2.0))
        sy, sx = h / out_h, w / out_w  # input pixels per output pixel
        start = np.array([top * sy, left * sx], np.float32)
        end = np.array([(top + size) * sy, (left + size) * sx], np.float32)
        return start, end

    def __call__(self, blobs: list[bytes]) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        outs = []
        for start in range(0, len(blobs), self.batch_size):
            chunk = blobs[start:start + self.batch_size]  # the last may be short: DALI allows it
            rois = [self._roi(b) for b in chunk]
            try:
                self.pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in chunk])
                self.pipe.feed_input("roi_start", [r[0] for r in rois])
                self.pipe.feed_input("roi_end", [r[1] for r in rois])
                (out,) = self.pipe.run()
                tensor = out.as_tensor()
                shape = tensor.shape() if callable(tensor.shape) else tensor.shape
                dst = torch.empty(tuple(shape), dtype=torch.float32, device=self.device)
                stream = torch.cuda.current_stream(self.device) if self.cuda else None
                feed_ndarray(tensor, dst, cuda_stream=stream)  # a copy: DALI reuses its buffers
            except Exception as err:  # DALI reports a bad sample by failing the whole batch
                self.pipe = self._build()  # a pipeline that raised is not reused
                raise DaliFailure(f"{type(err).__name__}: {err}") from err
            outs.append(dst.to(self.dtype))
        return torch.cat(outs) if outs else torch.empty(0, 3, int(self.pp["size"]),
                                                        int(self.pp["size"]), device=self.device,
                                                        dtype=self.dtype)


Decoded = tuple[list[Meta], torch.Tensor, list[Meta]]  # (meta rows, pixels on device, errors)


def _decode_chunk(chunk: Chunk, gpu_decode: Callable[[list[bytes]], torch.Tensor],
                  preprocess: dict[str, Any], device: torch.device, dtype: torch.dtype
                  ) -> Decoded:
    meta, errors = list(chunk.meta), list(chunk.errors)
    parts = [chunk.pixels.to(device, dtype, non_blocking=True)] if len(chunk.meta) else []
    if chunk.encoded:
        blobs = [data for _, data in chunk.encoded]
        try:
            gpu = gpu_decode(blobs)
            meta = [m for m, _ in chunk.encoded] + meta
            parts.insert(0, gpu)
        except DaliFailure as failure:  # decode this batch on the CPU instead
            transform, rows = eval_transform(preprocess), []
            for m, data in chunk.encoded:
                try:
                    rows.append(decode_image(data, transform, dtype))
                    meta.append(m)
                except ImageError as err:
                    errors.append(m._replace(error=f"{err} (DALI decode failed too: {failure})"))
            if rows:
                parts.append(torch.stack(rows).to(device, non_blocking=True))
    size = int(preprocess["size"])
    pixels = (torch.cat(parts) if parts
              else torch.empty(0, 3, size, size, device=device, dtype=dtype))
    return meta, pixels, errors


_DONE = object()


def iter_dali(chunks: Iterable[Chunk], gpu_decode: Callable[[list[bytes]], torch.Tensor],
              preprocess: dict[str, Any], device: torch.device | str,
              dtype: torch.dtype = torch.float32, prefetch: int = 2) -> Iterator[Decoded]:
    """Decode each chunk's encoded images with ``gpu_decode`` in a background thread.

    ``gpu_decode`` raises ``DaliFailure`` for a batch it cannot decode: those images are decoded
    by PIL instead. At most ``prefetch`` decoded batches wait in the queue.
    """
    device = torch.device(device)
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(obj: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # the thread's current device is per thread
            for chunk in chunks:
                if not put(_decode_chunk(chunk, gpu_decode, preprocess, device, dtype)):
                    return
            put(_DONE)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(err)

    thread = threading.Thread(target=produce, name="aigid-dali-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            got = q.get()
            if got is _DONE:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        thread.join(timeout=5)
