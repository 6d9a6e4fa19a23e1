"""The database side: the connector, the store the relay runs its named queries through, the
migration runner, grants, and the status and dead-event queries. Every statement is in ``sql/``."""
