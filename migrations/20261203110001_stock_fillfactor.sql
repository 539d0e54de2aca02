-- migrate:up
-- Stock rows are updated on every reservation and every release. With full pages (the
-- default fillfactor of 100) an update that finds no room on its row's page is not HOT:
-- the new version goes to another page, with a new stock_pkey entry and a lock record
-- (in the steady bench about 0.45 of such updates per item, 75 bytes of WAL). Leaving
-- 30% of each page free keeps them HOT on the same page (bench/pgcost.py: the stock
-- statement's WAL 160 -> 125 bytes per item, no stock_pkey inserts; docs/benchmark.md,
-- issue 13 step 7). A storage parameter, not a column (DESIGN.md section 3): pages
-- written from now on keep the room; existing full pages gain it as VACUUM frees them.
-- SHARE UPDATE EXCLUSIVE lock: reads and writes of stock go on meanwhile.
ALTER TABLE stock SET (fillfactor = 70);

-- migrate:down
ALTER TABLE stock RESET (fillfactor);
