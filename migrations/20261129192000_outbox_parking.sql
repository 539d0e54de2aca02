-- migrate:up
-- An outbox row the broker refuses for good (too large, not authorised, invalid topic) is
-- parked: kept for an operator (`release-worker doctor` lists them), never re-sent by the
-- relay, and out of the way of the rows behind it (DESIGN.md §7).
ALTER TABLE outbox ADD COLUMN parked_at timestamptz, ADD COLUMN park_reason text;
GRANT UPDATE (parked_at, park_reason) ON outbox TO release_worker;

-- migrate:down
REVOKE UPDATE (parked_at, park_reason) ON outbox FROM release_worker;
ALTER TABLE outbox DROP COLUMN park_reason, DROP COLUMN parked_at;
