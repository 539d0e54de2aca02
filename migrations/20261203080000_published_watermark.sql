-- migrate:up
-- Item results of a freshly applied record are no longer written to the outbox: they are
-- stored once, in its inbox row, and published from memory after the commit. A partition's
-- published_offset says how far that publication is acknowledged: every inbox row of the
-- partition with source_offset < published_offset has had its results acknowledged by the
-- broker. A partition's next owner republishes [published_offset, next_offset) from the
-- inbox before it applies anything (docs/guarantees.md). NULL: nothing is known published
-- (the range starts at 0).
ALTER TABLE consumer_offsets ADD COLUMN published_offset bigint;
-- Until now every result went through the outbox: what was applied is covered by it.
UPDATE consumer_offsets SET published_offset = next_offset;
GRANT UPDATE (published_offset) ON consumer_offsets TO release_worker;
-- The republication reads a partition's inbox rows by offset.
CREATE INDEX inbox_source_idx ON inbox (source_topic, source_partition, source_offset);

-- migrate:down
DROP INDEX inbox_source_idx;
REVOKE UPDATE (published_offset) ON consumer_offsets FROM release_worker;
ALTER TABLE consumer_offsets DROP COLUMN published_offset;
