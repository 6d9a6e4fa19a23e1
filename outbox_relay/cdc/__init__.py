"""CDC mode (``serve --mode cdc``): outbox inserts streamed from the WAL through a logical
replication slot with pgoutput: the stream client, the decoder, slot set-up and WAL events."""
