-- migrate:up
-- Inbox rows older than WORKER_INBOX_RETENTION_HOURS are pruned by the sweeper: the
-- index finds them, and the worker role may delete them.
CREATE INDEX inbox_processed_at_idx ON inbox (processed_at);
GRANT DELETE ON inbox TO release_worker;

-- migrate:down
REVOKE DELETE ON inbox FROM release_worker;
DROP INDEX inbox_processed_at_idx;
