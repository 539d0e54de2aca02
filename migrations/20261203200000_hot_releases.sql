-- migrate:up
-- HOT releases (docs/benchmark.md, issue 13 step 11). A release changes a reservation's
-- `status`, which the btree expiry index has in its predicate: every release wrote a
-- new row version on another page with an entry in each index (555 bytes of WAL).
-- From PostgreSQL 16, a BRIN index is "summarizing": its columns, predicate included,
-- do not block a HOT update. So on 16 and later the expiry index becomes a partial BRIN
-- and the table keeps half of each new page free for the new versions (fillfactor 50;
-- a storage parameter, not a column, DESIGN.md section 3). On 15 and older any index
-- blocks HOT, and the btree stays: nothing changes there.
--
-- A BRIN summary only widens: a range of pages that held a reserved row keeps its
-- `expires_at` bounds after the row is released, and the sweep's due query would read
-- it again on every pass. A second BRIN, on every row's `expires_at` in UTC, tells which
-- page ranges hold rows whose expiry just passed; the sweeper re-summarises those ranges
-- of the partial index (release_worker_resummarize_expiry below) once their rows are
-- expired or released, so that the due query reads only ranges with rows still
-- reserved. It indexes an expression so that the due query (on `expires_at` itself)
-- cannot use it instead of the partial one: its summaries are never tight.
-- CREATE INDEX holds a SHARE lock (inserts and updates of reservations wait) for one
-- sequential scan of the table.
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 160000 THEN
        CREATE INDEX reservations_reserved_expiry_brin ON reservations
            USING brin (expires_at) WITH (pages_per_range = 16, autosummarize = on)
            WHERE status = 'reserved';
        CREATE INDEX reservations_expiry_utc_brin ON reservations
            USING brin ((expires_at AT TIME ZONE 'UTC'))
            WITH (pages_per_range = 16, autosummarize = on);
        DROP INDEX reservations_reserved_expiry_idx;
        ALTER TABLE reservations SET (fillfactor = 50);
    END IF;
END
$$;

-- Where the sweepers' care for the partial BRIN stands (one row): the page ranges with
-- rows due up to `tight_until` were re-summarised after those rows came due, and the
-- rolling pass over the whole table goes on at `next_block`. Read and written only by
-- release_worker_resummarize_expiry, as the table's owner.
CREATE TABLE expiry_summaries (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    tight_until timestamptz NOT NULL,
    next_block  bigint NOT NULL DEFAULT 0
);
-- The index built above is tight as of now.
INSERT INTO expiry_summaries (tight_until) VALUES (now());

-- Re-summarise the page ranges of reservations_reserved_expiry_brin whose rows came due
-- since the last call (reaching back `p_overlap` before it, for rows a release held
-- during a sweep and released after it; at most an hour of them a call, to bound a call
-- after a long stop), then the next `p_rolling` ranges of the whole table in turn (for
-- rows that leave `reserved` long after they came due, when the sweep lagged). Return
-- how many ranges; 0 where there is no such index (PostgreSQL 15) or when a call ended
-- less than `p_every` ago (several workers sweep); -1 when another session held the
-- state row or the table's SHARE UPDATE EXCLUSIVE lock (VACUUM, ANALYZE, another
-- sweeper) past the lock timeout: the caller tries again at its next pass. The
-- brin_*_range functions need the table's owner (MAINTAIN from PostgreSQL 17), which
-- the worker's role is not: SECURITY DEFINER runs this as the owner, and it does
-- nothing else. The lock timeout is below deadlock_timeout so that waiting never
-- cancels an autovacuum of the table.
CREATE FUNCTION release_worker_resummarize_expiry(
    p_overlap interval, p_every interval, p_rolling integer
) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, public
SET lock_timeout = '200ms'
SET enable_seqscan = off
AS $$
DECLARE
    summary regclass := to_regclass('public.reservations_reserved_expiry_brin');
    state public.expiry_summaries;
    per_range bigint;
    table_blocks bigint;
    until_t timestamptz;
    first_block bigint;
    done integer := 0;
BEGIN
    IF summary IS NULL THEN
        RETURN 0;
    END IF;
    SELECT * INTO STRICT state FROM public.expiry_summaries FOR UPDATE;
    IF state.tight_until > now() - p_every THEN
        RETURN 0;
    END IF;
    SELECT COALESCE(max(o.option_value::bigint), 128) INTO per_range
      FROM pg_class c, pg_options_to_table(c.reloptions) o
     WHERE c.oid = summary AND o.option_name = 'pages_per_range';
    until_t := least(now(), state.tight_until + interval '1 hour');
    FOR first_block IN
        SELECT DISTINCT (ctid::text::point)[0]::bigint / per_range * per_range
          FROM public.reservations
         WHERE (expires_at AT TIME ZONE 'UTC') > ((state.tight_until - p_overlap) AT TIME ZONE 'UTC')
           AND (expires_at AT TIME ZONE 'UTC') <= (until_t AT TIME ZONE 'UTC')
         ORDER BY 1
    LOOP
        PERFORM brin_desummarize_range(summary, first_block);
        PERFORM brin_summarize_range(summary, first_block);
        done := done + 1;
    END LOOP;
    table_blocks := pg_relation_size('public.reservations') / current_setting('block_size')::bigint;
    first_block := CASE WHEN state.next_block < table_blocks THEN state.next_block ELSE 0 END;
    FOR i IN 1 .. p_rolling LOOP
        EXIT WHEN first_block >= table_blocks;
        PERFORM brin_desummarize_range(summary, first_block);
        PERFORM brin_summarize_range(summary, first_block);
        done := done + 1;
        first_block := first_block + per_range;
    END LOOP;
    UPDATE public.expiry_summaries SET tight_until = until_t, next_block = first_block;
    RETURN done;
EXCEPTION WHEN lock_not_available THEN
    RETURN -1;
END
$$;
REVOKE ALL ON FUNCTION release_worker_resummarize_expiry(interval, interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION release_worker_resummarize_expiry(interval, interval, integer)
    TO release_worker;

-- migrate:down
DROP FUNCTION release_worker_resummarize_expiry(interval, interval, integer);
DROP TABLE expiry_summaries;
DO $$
BEGIN
    IF to_regclass('public.reservations_reserved_expiry_brin') IS NOT NULL THEN
        CREATE INDEX reservations_reserved_expiry_idx ON reservations (expires_at)
            WHERE status = 'reserved';
        DROP INDEX reservations_expiry_utc_brin;
        DROP INDEX reservations_reserved_expiry_brin;
        ALTER TABLE reservations RESET (fillfactor);
    END IF;
END
$$;
