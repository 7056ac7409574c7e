"""Training: MiraGe's prompt training (``mirage``, ``state``), torchrun helpers (``dist``,
``gather``) and UniGenDet's GDUF and DIGA stages (``unigendet``)."""
