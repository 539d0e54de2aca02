-- migrate:up
-- The least-privilege role the worker runs as (docs/errors.md, "Database role").
-- NOLOGIN: operators create a login user and `GRANT release_worker TO <user>`.
-- Roles are cluster-wide, so an existing one (another database, or created by a DBA
-- beforehand) is reused.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'release_worker') THEN
        CREATE ROLE release_worker NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO release_worker;
-- `run` refuses an unmigrated database: it reads the applied versions.
GRANT SELECT ON schema_migrations TO release_worker;
-- Authentication: partners are read, never changed.
GRANT SELECT ON partners TO release_worker;
-- Releases and expiry change only these columns; never on_hand, quantity, partner_id,
-- and nothing is inserted or deleted. (UPDATE on a column also allows SELECT ... FOR UPDATE.)
GRANT SELECT, UPDATE (status, released_at, release_event_id) ON reservations TO release_worker;
GRANT SELECT, UPDATE (reserved) ON stock TO release_worker;
-- The worker's own tables. Inbox rows are written once and kept (replays read them).
GRANT SELECT, INSERT ON inbox TO release_worker;
-- Outbox rows are claimed with FOR UPDATE SKIP LOCKED (which needs UPDATE on some
-- column; created_at is the one) and deleted once published.
GRANT SELECT, INSERT, DELETE, UPDATE (created_at) ON outbox TO release_worker;
GRANT USAGE ON SEQUENCE outbox_id_seq TO release_worker;
GRANT SELECT, INSERT, UPDATE (next_offset, updated_at) ON consumer_offsets TO release_worker;

-- migrate:down
REVOKE ALL ON schema_migrations, partners, reservations, stock, inbox, outbox,
    consumer_offsets FROM release_worker;
REVOKE ALL ON SEQUENCE outbox_id_seq FROM release_worker;
REVOKE ALL ON SCHEMA public FROM release_worker;
-- The role itself is left in place: it may hold grants in other databases of the cluster.
