-- migrate:up
-- The worker's own tables and the indexes its queries need.

-- Whole-cart release looks reservations up by (partner, cart).
CREATE INDEX reservations_partner_cart_idx ON reservations (partner_id, cart_id);
-- The expiry sweeper scans only what is still held.
CREATE INDEX reservations_reserved_expiry_idx ON reservations (expires_at)
    WHERE status = 'reserved';

-- One row per processed event: the idempotency key (partner, eventId) and the
-- exact result payloads, re-sent byte for byte when the event is replayed (G2, G3).
CREATE TABLE inbox (
    partner_id       text NOT NULL,
    event_id         text NOT NULL,
    cart_id          text NOT NULL,
    source_topic     text NOT NULL,
    source_partition int NOT NULL,
    source_offset    bigint NOT NULL,
    processed_at     timestamptz NOT NULL DEFAULT now(),
    results          bytea[] NOT NULL,
    PRIMARY KEY (partner_id, event_id)
);

-- Result and dead-letter records committed with the work that produced them,
-- deleted once the broker acknowledged them (I3).
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    topic      text NOT NULL,
    key        bytea,
    headers    bytea NOT NULL,
    payload    bytea,                 -- NULL only for a dead-lettered record that had no value
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The next offset to process per partition, advanced in the same transaction
-- as the work. A record below it was already applied: it is skipped, so a
-- crash between the database commit and the Kafka commit, or a zombie worker
-- after a rebalance, never applies a record twice (G1, G3).
CREATE TABLE consumer_offsets (
    group_id    text NOT NULL,
    topic       text NOT NULL,
    partition   int NOT NULL,
    next_offset bigint,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- migrate:down
DROP TABLE consumer_offsets;
DROP TABLE outbox;
DROP TABLE inbox;
DROP INDEX reservations_reserved_expiry_idx;
DROP INDEX reservations_partner_cart_idx;
