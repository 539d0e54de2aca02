-- migrate:up
-- The headers of an event's results (event-id, partner-id, the copied session and tag), so
-- that a replay is its first publication byte for byte, headers included (G2), whatever
-- headers the replaying record carries. NULL for rows recorded before this column existed
-- and for tombstones (pruned with the results): their replays rebuild the headers from the
-- replaying record.
ALTER TABLE inbox ADD COLUMN result_headers bytea;
GRANT UPDATE (result_headers) ON inbox TO release_worker;

-- migrate:down
REVOKE UPDATE (result_headers) ON inbox FROM release_worker;
ALTER TABLE inbox DROP COLUMN result_headers;
