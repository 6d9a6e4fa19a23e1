"""The relay: claim pending outbox rows, publish them with confirms in per-aggregate order, and
settle them (``loop``), fed by a source of rows (``sources``) and reported to hooks (``hooks``)."""
