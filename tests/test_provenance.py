"""Provenance evidence (``aigid.provenance``): every marker made here, hostile files, and the scan,
store and export plumbing. Files are built in the tests: Pillow writes text chunks, XMP and EXIF;
JUMBF boxes are assembled by hand; a signed C2PA manifest is made offline with c2pa-python and a
throwaway certificate chain (skipped only when c2pa-python is not installed)."""
import csv
import datetime
import functools
import io
import json
import random
import sqlite3
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import aigid
from aigid.data.decode_cpu import Chunk, Meta, ScanDataset
from aigid.provenance import evidence_json, provenance_of, read_evidence
from aigid.provenance import xmp as xmp_mod
from aigid.scanning.local import scan, scan_to_store
from aigid.scanning.store import APPLICATION_ID, SCHEMA_VERSION, ResultRow, ResultStore

DST = "http://cv.iptc.org/newscodes/digitalsourcetype/"
C2PA_UUID = b"c2pa" + bytes.fromhex("0011001080000AA00389B71".rjust(24, "0"))


# --------------------------------------------------------------------------- file builders


def _img(seed=0, size=16):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _png(info=None, seed=0) -> bytes:
    buf = io.BytesIO()
    _img(seed).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def _jpeg(seed=0, **kw) -> bytes:
    buf = io.BytesIO()
    _img(seed).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _text_png(*pairs, zip=False) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in pairs:
        info.add_text(key, value, zip=zip)
    return _png(info)


def _with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """``jpeg`` with one more marker segment right after SOI."""
    return jpeg[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _with_chunk(png: bytes, ctype: bytes, data: bytes, length=None) -> bytes:
    """``png`` with one more chunk before IEND (``length`` may lie)."""
    at = png.rindex(b"IEND") - 4
    n = len(data) if length is None else length
    chunk = struct.pack(">I", n) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))
    return png[:at] + chunk + png[at:]


def _box(btype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + btype + payload


def _jumbf(label="c2pa", uuid=C2PA_UUID) -> bytes:
    """A C2PA-shaped manifest store: superbox, description box, one (empty) manifest inside."""
    desc = _box(b"jumd", uuid + b"\x03" + label.encode() + b"\x00")
    manifest = _box(b"jumb", _box(b"jumd", b"c2ma" + bytes(12) + b"\x03urn:uuid:1\x00"))
    return _box(b"jumb", desc + manifest)


def _app11(box: bytes) -> bytes:
    return b"JP" + struct.pack(">HI", 1, 1) + box  # CI, En (box instance), Z (packet number)


def _xmp(value: str, form: str = "attr") -> bytes:
    prop = {"attr": f'<rdf:Description Iptc4xmpExt:DigitalSourceType="{value}"/>',
            "element": f"<rdf:Description><Iptc4xmpExt:DigitalSourceType>{value}"
                       "</Iptc4xmpExt:DigitalSourceType></rdf:Description>",
            "resource": f'<rdf:Description><Iptc4xmpExt:DigitalSourceType rdf:resource="{value}"/>'
                        "</rdf:Description>"}[form]
    return (b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">' + prop.encode()
            + b'</rdf:RDF></x:xmpmeta><?xpacket end="w"?>')


def _exif(**tags) -> Image.Exif:
    ex = Image.Exif()
    for tag, value in tags.items():
        ex[{"software": 0x0131, "make": 0x010F, "model": 0x0110}[tag]] = value
    return ex


# --------------------------------------------------------------------------- markers


@pytest.mark.parametrize("pairs, name, extra", [
    ([("parameters", "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Model: sdxl_base, "
                     "Version: v1.9.4")], "AUTOMATIC1111/Forge", {"model": "sdxl_base"}),
    ([("parameters", "a cat\nSteps: 20, Sampler: Euler, Version: f2.0.1v1.10.1")], "Forge", {}),
    ([("prompt", '{"3": {"class_type": "KSampler"}}'), ("workflow", '{"nodes": []}')], "ComfyUI", {}),
    ([("workflow", '{"nodes": []}')], "ComfyUI", {}),
    ([("Software", "NovelAI"), ("Source", "NovelAI Diffusion V3 4BDE2A90"), ("Comment", "{}")],
     "NovelAI", {"model": "NovelAI Diffusion V3 4BDE2A90"}),
    ([("invokeai_metadata", '{"model": {"name": "sd-1.5"}}')], "InvokeAI", {}),
    ([("sd-metadata", "{}")], "InvokeAI", {}),
])
@pytest.mark.parametrize("zip", [False, True])
def test_png_generator_chunks_declare_ai(pairs, name, extra, zip):
    """Each tool's own PNG keys (tEXt, and zTXt/iTXt when compressed) name it. Catches a key
    spelt differently from what the tool writes, or compressed chunks left unread."""
    ev = read_evidence(_text_png(*pairs, zip=zip))
    assert ev["provenance"] == "declared-ai", ev
    (gen,) = ev["generator"]
    assert gen["name"] == name and gen["in"].startswith("png:")
    assert extra.items() <= gen.items()


def test_plain_text_chunks_and_plain_files_declare_nothing():
    """A PNG with an ordinary Title/Comment, a ComfyUI-like key that is not JSON, a bare JPEG:
    ``none``. Catches a generator table that fires on any text chunk."""
    assert read_evidence(_text_png(("Title", "holiday"), ("Comment", "nice"),
                                   ("prompt", "say cheese"))) == {"provenance": "none"}
    assert read_evidence(_jpeg()) == {"provenance": "none"}
    assert read_evidence(b"GIF89a" + bytes(20)) == {"provenance": "none"}


@pytest.mark.parametrize("form", ["attr", "element", "resource"])
@pytest.mark.parametrize("code, summary", [
    ("trainedAlgorithmicMedia", "declared-ai"),
    ("compositeWithTrainedAlgorithmicMedia", "declared-ai"),
    ("algorithmicMedia", "declared-ai"),
    ("digitalCapture", "declared-camera"),
    ("digitalArt", "none"),
])
def test_iptc_digital_source_type_in_jpeg_xmp(form, code, summary):
    """The three RDF spellings of the property in a JPEG APP1 XMP packet. Catches a pattern
    that reads only one spelling, or a summary that treats every source type as AI."""
    ev = read_evidence(_jpeg(xmp=_xmp(DST + code, form)))
    assert ev["digital_source_type"] == [code] and ev["provenance"] == summary


@pytest.mark.parametrize("zip", [False, True])
def test_xmp_in_png_itxt_and_webp(zip):
    """XMP under ``XML:com.adobe.xmp`` in a PNG iTXt (plain and compressed) and in a WebP XMP
    chunk. Catches a reader that looks only at JPEG APP1."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", _xmp(DST + "trainedAlgorithmicMedia").decode(), zip=zip)
    assert read_evidence(_png(info))["declared_by"] == ["xmp:trainedAlgorithmicMedia"]
    buf = io.BytesIO()
    _img().save(buf, "WEBP", xmp=_xmp(DST + "digitalCapture"))
    assert read_evidence(buf.getvalue())["provenance"] == "declared-camera"


def test_ai_declaration_wins_over_a_capture_claim():
    """A composite: a capture claim in XMP and a generator's EXIF Software. Catches a summary
    that lets the first claim found decide."""
    ev = read_evidence(_jpeg(xmp=_xmp(DST + "digitalCapture"), exif=_exif(software="Adobe Firefly")))
    assert ev["provenance"] == "declared-ai" and ev["declared_by"] == ["jpeg:app1:software"]


@pytest.mark.parametrize("tags, name", [
    ({"software": "Adobe Firefly 2.0"}, "Adobe Firefly"),
    ({"software": "NovelAI"}, "NovelAI"),
    ({"make": "Midjourney"}, "Midjourney"),
    ({"software": "Adobe Photoshop 25.0", "make": "Canon", "model": "EOS R5"}, None),
])
def test_exif_software_and_make(tags, name):
    """EXIF IFD0 names in JPEG; a camera and a photo editor are not generators. Catches a
    table that matches "Adobe" alone, or a reader of the wrong IFD0 tags."""
    ev = read_evidence(_jpeg(exif=_exif(**tags)))
    assert ev["exif"] == tags
    if name is None:
        assert ev["provenance"] == "none" and "generator" not in ev
    else:
        assert ev["generator"][0]["name"] == name and ev["provenance"] == "declared-ai"


def test_sd_webui_parameters_in_exif_user_comment():
    """SD web UI saves JPEGs with the parameters in EXIF UserComment (UNICODE, big-endian UCS-2
    as piexif writes it); the prompt itself is not copied into the evidence. Catches a reader
    that misses the Exif sub-IFD or leaks the prompt text."""
    text = "a secret prompt\nSteps: 30, Sampler: DPM++ 2M, Model: juggernaut, Version: v1.7.0"
    ex = Image.Exif()
    ex.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")
    ev = read_evidence(_jpeg(exif=ex))
    assert ev["generator"] == [{"name": "AUTOMATIC1111/Forge", "in": "jpeg:app1:user_comment",
                                "model": "juggernaut", "version": "v1.7.0"}]
    assert "secret" not in json.dumps(ev)


def test_jumbf_manifest_store_in_jpeg_app11_and_png_cabx():
    """A hand-made C2PA manifest store: present in JPEG APP11 and PNG caBX, read without the
    SDK. Presence alone declares nothing (a manifest may record a camera or an edit). Catches
    a JUMBF walker that misses either container or treats presence as an AI claim."""
    for data, where in [(_with_segment(_jpeg(), 0xEB, _app11(_jumbf())), "jpeg:app11"),
                        (_with_chunk(_png(), b"caBX", _jumbf()), "png:caBX")]:
        ev = read_evidence(data, read_c2pa=False)
        assert ev == {"c2pa": {"present": True, "in": where, "bytes": len(_jumbf())},
                      "provenance": "none"}
    other = _with_segment(_jpeg(), 0xEB, _app11(_jumbf(label="jp2c", uuid=bytes(16))))
    assert read_evidence(other, read_c2pa=False) == {"provenance": "none"}  # JUMBF, not C2PA


def test_presence_is_reported_even_when_the_sdk_cannot_read_the_claims():
    """With c2pa-python installed, a manifest store with no valid claim still shows as present,
    with the SDK's complaint beside it, never as a crash."""
    pytest.importorskip("c2pa")
    ev = read_evidence(_with_chunk(_png(), b"caBX", _jumbf()))
    assert ev["c2pa"]["present"] is True and "read_error" in ev["c2pa"]
    assert ev["provenance"] == "none"


# --------------------------------------------------------------------------- signed C2PA


@pytest.fixture(scope="module")
def signer():
    """An ES256 signer with a throwaway CA -> signer chain (c2pa-rs refuses a self-signed
    end-entity certificate), made offline."""
    c2pa = pytest.importorskip("c2pa")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aigid tests"),
                          x509.NameAttribute(NameOID.COUNTRY_NAME, "US")])

    def cert(subject, issuer, key, sign_key, ca):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False))
        if ca:
            b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                              False, False), True)
        else:
            b = (b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                               False, False), True)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                                False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                     sign_key.public_key()), False))
        return b.sign(sign_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    chain = cert("signer", "test CA", key, ca_key, False) + cert("test CA", "test CA", ca_key,
                                                                 ca_key, True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return c2pa, chain, pem


def _signed(signer, code: str, fmt="JPEG") -> bytes:
    c2pa, chain, pem = signer
    manifest = {"claim_generator_info": [{"name": "test-generator", "version": "1.0"}],
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "digitalSourceType": DST + code}]}}]}
    settings = c2pa.Settings.from_dict({"verify": {"remote_manifest_fetch": False,
                                                   "ocsp_fetch": False},
                                        "builder": {"thumbnail": {"enabled": False}}})
    src, dst = io.BytesIO(), io.BytesIO()
    _img(seed=3, size=32).save(src, fmt)
    src.seek(0)
    with c2pa.Builder(manifest, context=c2pa.Context(settings=settings)) as builder:
        builder.sign(c2pa.Signer.from_info(c2pa.C2paSignerInfo(
            c2pa.C2paSigningAlg.ES256, chain, pem, None)), "image/" + fmt.lower(), src, dst)
    return dst.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_signed_c2pa_manifest_declares_ai(signer, fmt):
    """A manifest signed here with c2pa.created / trainedAlgorithmicMedia: its generator, the
    action and a ``Valid`` state are read, and it declares AI. Catches an assertion label or
    action key read from the wrong place in the SDK's JSON."""
    data = _signed(signer, "trainedAlgorithmicMedia", fmt)
    ev = read_evidence(data)
    c2pa = ev["c2pa"]
    assert c2pa["present"] and c2pa["claim_generator"] == "test-generator 1.0"
    assert c2pa["actions"] == [{"action": "c2pa.created",
                                "digital_source_type": "trainedAlgorithmicMedia"}]
    assert c2pa["validation_state"] == "Valid"  # a good signature; no trust list configured
    assert ev["provenance"] == "declared-ai" and ev["declared_by"] == ["c2pa:trainedAlgorithmicMedia"]
    assert read_evidence(data, read_c2pa=False)["provenance"] == "none"  # presence only


def test_tampered_capture_manifest_does_not_vouch_for_a_camera(signer):
    """A capture claim declares ``declared-camera`` while its hash holds; once the image bytes
    change after signing, the SDK says ``Invalid`` and the claim is not believed. Catches a
    summary that ignores the validation state."""
    data = _signed(signer, "digitalCapture", "PNG")
    assert read_evidence(data)["provenance"] == "declared-camera"
    idat = data.index(b"IDAT") + 8
    tampered = data[:idat] + bytes([data[idat] ^ 0xFF]) + data[idat + 1:]
    ev = read_evidence(tampered)
    assert ev["c2pa"]["validation_state"] == "Invalid" and ev["provenance"] == "none"


# --------------------------------------------------------------------------- hostile files


@functools.lru_cache(maxsize=1)
def _hostile():
    jpeg, png = _jpeg(), _png()
    big_xmp = b"<x:xmpmeta>" + b" " * (xmp_mod.MAX_PACKET + 1) + b"</x:xmpmeta>"
    bomb = zlib.compress(b" " * (16 << 20), 9)  # 16 MiB of spaces in ~16 kB
    itxt_bomb = b"XML:com.adobe.xmp\x00\x01\x00\x00\x00" + bomb
    jumbf = _jumbf()
    return {
        "jpeg segment past the end": _with_segment(jpeg, 0xE1, b"Exif\x00\x00II*\x00")[:30],
        "jpeg XMP segment past the end": (b"\xff\xd8\xff\xe1\xff\xf0http://ns.adobe.com/xap/1.0/\x00"
                                          + _xmp(DST + "digitalCapture")),
        "jpeg segment length < 2": jpeg[:2] + b"\xff\xe1\x00\x01" + jpeg[2:],
        "jpeg cut in the headers": jpeg[:5],
        "png chunk longer than the file": _with_chunk(png, b"tEXt", b"parameters\x00x", 10 ** 6),
        "png without IEND": png[:png.rindex(b"IEND") - 4],
        "png chunk length > 2^31": _with_chunk(png, b"tEXt", b"a\x00b", 0xFFFFFFF0),
        "png oversized XMP": _with_chunk(png, b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00"
                                         + big_xmp),
        "png XMP zlib bomb": _with_chunk(png, b"iTXt", itxt_bomb),
        "png bad zlib in parameters": _with_chunk(png, b"zTXt", b"parameters\x00\x00garbage"),
        "png text without keyword": _with_chunk(png, b"tEXt", b"x" * 100),
        "jumbf not a superbox": _with_segment(jpeg, 0xEB, _app11(_box(b"xxxx", bytes(40)))),
        "jumbf without jumd": _with_chunk(png, b"caBX", _box(b"jumb", _box(b"free", bytes(30)))),
        "jumbf box larger than its chunk": _with_chunk(png, b"caBX",
                                                       struct.pack(">I", 10 ** 6) + jumbf[4:]),
        "jumbf label not terminated": _with_chunk(png, b"caBX", _box(b"jumb", _box(
            b"jumd", C2PA_UUID + b"\x03" + b"c" * 300))),
        "jumbf header < 8": _with_segment(jpeg, 0xEB, b"JP" + struct.pack(">HI", 1, 1)
                                          + b"\x00\x00\x00\x04jumbxxxx"),
        "exif bad IFD offset": _with_segment(jpeg, 0xE1, b"Exif\x00\x00II*\x00\xff\xff\x00\x00"),
        "exif not TIFF": _with_segment(jpeg, 0xE1, b"Exif\x00\x00garbage!"),
        "exif tag past the block": _with_segment(jpeg, 0xE1, b"Exif\x00\x00II*\x00\x08\x00\x00\x00"
                                                 + b"\x01\x00" + struct.pack("<HHII", 0x0131, 2,
                                                                             500, 9999)),
        "webp chunk past the end": b"RIFF\x00\x00\x00\x00WEBPXMP " + struct.pack("<I", 999) + b"ab",
        "bmff box size < header": b"\x00\x00\x00\x10ftypavif\x00\x00\x00\x00" + b"\x00\x00\x00\x04meta",
        "bmff box past the end": b"\x00\x00\x00\x10ftypheic\x00\x00\x00\x00" + b"\x00\x00\x10\x00uuid",
    }


@pytest.mark.parametrize("name", list(_hostile()))
def test_hostile_files_give_evidence_error(name):
    """Truncated, oversized and malformed segments, chunks and boxes: ``{"evidence_error":
    reason}``, no exception, and no giant allocation (the 16 MiB zlib bomb and the 4 MiB+
    packet are refused by size). Catches a missing bounds or size check."""
    ev = read_evidence(_hostile()[name])
    assert set(ev) == {"evidence_error"} and ev["evidence_error"], ev
    json.loads(evidence_json(_hostile()[name]))


def test_random_corruption_never_raises():
    """300 random byte edits of files rich in markers: always a JSON-able dict with a
    ``provenance`` or an ``evidence_error``. Catches any unguarded index or decode."""
    seeds = [_with_segment(_jpeg(xmp=_xmp(DST + "digitalCapture"),
                                 exif=_exif(software="NovelAI")), 0xEB, _app11(_jumbf())),
             _with_chunk(_text_png(("parameters", "Steps: 1"), ("workflow", "{}"), zip=True),
                         b"caBX", _jumbf())]
    rng = random.Random(0)
    for k in range(300):
        data = bytearray(seeds[k % 2])
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(min(len(data), 400))
            data[at] = rng.randrange(256)
        if k % 5 == 0:
            data = data[:rng.randrange(len(data))]
        ev = read_evidence(bytes(data), read_c2pa=False)
        assert ("provenance" in ev) != ("evidence_error" in ev)
        json.dumps(ev)


# --------------------------------------------------------------------------- scanning and the store


@pytest.fixture(scope="module")
def detector(tiny_mirage_folder):
    return aigid.load_detector(str(tiny_mirage_folder))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov")
    (root / "a1111.png").write_bytes(_text_png(("parameters", "cat\nSteps: 20, Sampler: Euler")))
    (root / "xmp_ai.jpg").write_bytes(_jpeg(1, xmp=_xmp(DST + "trainedAlgorithmicMedia")))
    (root / "camera.jpg").write_bytes(_jpeg(2, xmp=_xmp(DST + "digitalCapture")))
    (root / "plain.png").write_bytes(_png(seed=3))
    (root / "plain.jpg").write_bytes(_jpeg(4))
    (root / "broken.png").write_bytes(_text_png(("parameters", "Steps: 1"))[:60])  # cut short
    return root


def _run(folder, detector, **kw):
    return {r.id.rsplit("/", 1)[-1]: r for r in scan([folder], detector, batch_size=2,
                                                     num_workers=kw.pop("num_workers", 0),
                                                     progress=False, **kw)}


def test_scan_stores_and_exports_evidence(detector, folder, tmp_path):
    """Evidence reaches ``ScanResult``, the store's column and all three exports (JSONL object,
    CSV JSON text, Parquet string); the summary counts declared-AI and, at threshold 1 (nothing
    is fake), all of them as missed. Catches evidence dropped between worker and store, or an
    export that writes it in the wrong form."""
    out, stats = tmp_path / "r.sqlite", {}
    got = _run(folder, detector, out=out, threshold=1.0, stats=stats,
               export=tmp_path / "r.jsonl")
    assert provenance_of(got["a1111.png"].evidence) == "declared-ai"
    assert provenance_of(got["xmp_ai.jpg"].evidence) == "declared-ai"
    assert provenance_of(got["camera.jpg"].evidence) == "declared-camera"
    assert json.loads(got["plain.jpg"].evidence) == {"provenance": "none"}
    assert got["broken.png"].error and "evidence_error" in json.loads(got["broken.png"].evidence)
    assert (stats["declared_ai"], stats["declared_ai_missed"], stats["declared_camera"]) == (2, 2, 1)
    with ResultStore(out, readonly=True) as store:
        stored = {r.id.rsplit("/", 1)[-1]: r.evidence for r in store.rows()}
        assert stored == {k: r.evidence for k, r in got.items()}
        store.export(tmp_path / "r.csv")
        pq = pytest.importorskip("pyarrow.parquet")
        store.export(tmp_path / "r.parquet")
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert {rec["id"].rsplit("/", 1)[-1]: rec["evidence"] for rec in lines} == {
        k: json.loads(v) for k, v in stored.items()}
    with open(tmp_path / "r.csv", newline="") as f:
        assert {rec["id"].rsplit("/", 1)[-1]: rec["evidence"] for rec in csv.DictReader(f)} == stored
    table = pq.read_table(tmp_path / "r.parquet")
    assert str(table.schema.field("evidence").type) == "string"
    assert sorted(table.column("evidence").to_pylist()) == sorted(stored.values())


def test_evidence_never_changes_scores_and_can_be_off(detector, folder):
    """Scores with and without evidence are identical, and ``evidence=False`` reads none and
    reports no declared counts; at threshold 0 nothing declared is missed. Catches evidence
    reading that touches the pixels, or a flag that is ignored."""
    stats_on, stats_off = {}, {}
    on = _run(folder, detector, threshold=0.0, stats=stats_on)
    off = _run(folder, detector, evidence=False, stats=stats_off)
    assert {k: r.score for k, r in on.items()} == {k: r.score for k, r in off.items()}
    assert all(r.evidence is None for r in off.values()) and "declared_ai" not in stats_off
    assert (stats_on["declared_ai"], stats_on["declared_ai_missed"]) == (2, 0)


def test_worker_processes_carry_evidence(detector, folder):
    """With a DataLoader worker the evidence crosses the process boundary in ``Meta``. Catches
    a field lost when chunks are pickled."""
    got = _run(folder, detector, num_workers=1)
    assert provenance_of(got["xmp_ai.jpg"].evidence) == "declared-ai"
    assert provenance_of(got["camera.jpg"].evidence) == "declared-camera"


def test_dali_route_carries_evidence_on_gpu_and_fallback_paths(detector, folder):
    """Bytes routed to the GPU decoder keep the evidence read before routing, whether the GPU
    decodes them or a failed GPU batch falls back to PIL (run here with a stand-in decoder:
    the routing is CPU code). Catches evidence read after routing, or dropped in the fallback."""
    from aigid.data.decode_dali import DaliFailure, _decode_chunk

    pp = dict(detector.config.preprocess)
    ds = ScanDataset([folder], pp, 8, route=lambda data: data[:2] == b"\xff\xd8", evidence=True)
    chunks = list(ds)
    encoded = [m for c in chunks for m, _ in c.encoded]
    assert {m.id.rsplit("/", 1)[-1]: provenance_of(m.evidence) for m in encoded} == {
        "xmp_ai.jpg": "declared-ai", "camera.jpg": "declared-camera", "plain.jpg": "none"}
    size = int(pp["size"])

    def gpu_ok(blobs):
        return torch.zeros(len(blobs), 3, size, size)

    def gpu_fails(blobs):
        raise DaliFailure("stand-in")

    for decode in (gpu_ok, gpu_fails):
        meta = [m for c in chunks for m in _decode_chunk(c, decode, pp, torch.device("cpu"),
                                                         torch.float32)[0]]
        assert {m.id: m.evidence for m in meta if m.id in {e.id for e in encoded}} == {
            m.id: m.evidence for m in encoded}


_V1 = f"""
CREATE TABLE runs (run INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, detector TEXT,
    preprocess TEXT, threshold REAL, version TEXT, decoder TEXT, paths TEXT, started REAL,
    finished REAL, summary TEXT);
CREATE TABLE results (id TEXT NOT NULL, model TEXT NOT NULL, hash TEXT, size INTEGER, score REAL,
    error TEXT, time REAL, run INTEGER REFERENCES runs (run), PRIMARY KEY (id, model));
INSERT INTO runs (model, threshold) VALUES ('m', 0.3);
INSERT INTO results VALUES ('a.jpg', 'm', 'h1', 10, 0.4, NULL, 1.0, 1),
                           ('c.jpg', 'm', NULL, NULL, NULL, 'unreadable', 1.0, 1);
PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1;
"""


def test_schema_1_file_is_read_then_migrated_keeping_rows(tmp_path):
    """A version-1 file (no evidence column) is read as it is without a byte changed, then the
    first writer adds the column in place: every row, run and label kept, evidence NULL, and
    new rows store theirs. Catches a migration that drops rows or a reader that needs the new
    column."""
    db = tmp_path / "v1.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(_V1)
    conn.close()
    before = db.read_bytes()
    expected = [("a.jpg", 0.4, 1, None, 1, None), ("c.jpg", None, None, "unreadable", 1, None)]
    with ResultStore(db, readonly=True) as store:
        assert [(r.id, r.score, r.label, r.error, r.run, r.evidence) for r in store.rows()] == expected
    assert db.read_bytes() == before
    with ResultStore(db) as store:
        assert [(r.id, r.score, r.label, r.error, r.run, r.evidence) for r in store.rows()] == expected
        store.write([ResultRow("b.jpg", "m", "h2", 3, 0.9, None, None, 2.0, 1, '{"provenance":"none"}')])
        assert [r.evidence for r in store.rows()] == [None, '{"provenance":"none"}', None]
        assert [r["threshold"] for r in store.runs()] == [0.3]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert "evidence" in [row[1] for row in conn.execute("PRAGMA table_info(results)")]
    conn.close()


def test_scan_to_store_summary_counts_declared(detector, folder, tmp_path):
    """``scan_to_store`` returns the declared counts, and a resumed run that skips everything
    counts nothing twice. Catches counts accumulated across runs or over skipped rows."""
    first = scan_to_store([folder], detector, out=tmp_path / "s.sqlite", batch_size=4,
                          num_workers=0, progress=False, threshold=1.0)
    assert (first["declared_ai"], first["declared_ai_missed"]) == (2, 2)
    again = scan_to_store([folder], detector, out=tmp_path / "s.sqlite", batch_size=4,
                          num_workers=0, progress=False, threshold=1.0)
    assert again["skipped"] == 6 and again["declared_ai"] == 0


def test_chunk_meta_defaults_keep_old_call_sites():
    """``Meta``/``Chunk`` built without evidence (as other decoders do) still work."""
    m = Meta("x", None, None, None)
    assert m.evidence is None and Chunk([m], torch.empty(1, 3, 2, 2)).meta[0].evidence is None
