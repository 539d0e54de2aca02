-- migrate:up
-- The tables shared with the checkout's reservation service (DESIGN.md §3).
-- Their columns are a contract: add indexes, never change columns.
CREATE TABLE partners (
    partner_id     text PRIMARY KEY,
    name           text NOT NULL,
    api_key_sha256 bytea NOT NULL UNIQUE,
    tag_ids        text[] NOT NULL DEFAULT '{}',
    status         text NOT NULL DEFAULT 'active'
);

CREATE TABLE stock (
    sku         text,
    location_id text DEFAULT 'default',
    on_hand     bigint NOT NULL CHECK (on_hand >= 0),
    reserved    bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    PRIMARY KEY (sku, location_id)
);

CREATE TABLE reservations (
    reservation_id   text PRIMARY KEY,
    partner_id       text NOT NULL REFERENCES partners,
    cart_id          text NOT NULL,
    cart_item_id     text NOT NULL,
    sku              text NOT NULL,
    location_id      text NOT NULL DEFAULT 'default',
    quantity         int NOT NULL CHECK (quantity > 0),
    status           text NOT NULL,
    expires_at       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    released_at      timestamptz,
    release_event_id text,
    FOREIGN KEY (sku, location_id) REFERENCES stock
);

-- migrate:down
DROP TABLE reservations;
DROP TABLE stock;
DROP TABLE partners;
