-- migrate:up transaction:false
-- `release-worker inspect cart` finds a cart's events in the inbox, which keeps every
-- event's key forever: without this index it read the whole table (143 MB per million
-- events, past the statement timeout at a few million). Built CONCURRENTLY (outside a
-- transaction) so that the workers keep inserting while it is built on a large inbox.
-- Its cost on the hot path, measured with bench/pgcost.py: about 50 bytes of WAL and
-- 1 µs of PostgreSQL time per item (docs/benchmark.md).
CREATE INDEX CONCURRENTLY IF NOT EXISTS inbox_partner_cart_idx ON inbox (partner_id, cart_id);

-- migrate:down transaction:false
DROP INDEX CONCURRENTLY IF EXISTS inbox_partner_cart_idx;
