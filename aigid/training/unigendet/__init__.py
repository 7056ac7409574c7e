"""UniGenDet training: GDUF (``gduf``), DIGA (``diga``), FSDP2 sharding (``shard``) and the
config-driven run behind ``aigid train-unigendet`` (``run``)."""
