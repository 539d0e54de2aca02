-- migrate:up
-- Pruning no longer deletes inbox rows: past WORKER_INBOX_RETENTION_HOURS a row keeps its
-- key (partner, eventId) and drops its result payloads (results = NULL), so a replay at any
-- age is still recognised and changes nothing (G3). The index covers only rows still
-- holding results, so a pruning pass never walks the tombstones.
ALTER TABLE inbox ALTER COLUMN results DROP NOT NULL;
DROP INDEX inbox_processed_at_idx;
CREATE INDEX inbox_unpruned_processed_at_idx ON inbox (processed_at) WHERE results IS NOT NULL;
REVOKE DELETE ON inbox FROM release_worker;
GRANT UPDATE (results) ON inbox TO release_worker;

-- migrate:down
REVOKE UPDATE (results) ON inbox FROM release_worker;
GRANT DELETE ON inbox TO release_worker;
DROP INDEX inbox_unpruned_processed_at_idx;
CREATE INDEX inbox_processed_at_idx ON inbox (processed_at);
-- The previous schema has no tombstones: pruned rows are deleted, as it pruned them.
DELETE FROM inbox WHERE results IS NULL;
ALTER TABLE inbox ALTER COLUMN results SET NOT NULL;
