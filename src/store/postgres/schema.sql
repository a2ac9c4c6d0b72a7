-- The PostgreSQL schema, as numbered migrations. Each part between
-- `-- migration N` lines runs once, in order, in one transaction, under an
-- advisory lock (several instances may start at once). Only ever append:
-- an older chatbridge must keep working on a newer schema during a rolling
-- restart (add columns with defaults and tables; never drop or rename).

-- migration 1
CREATE TABLE events (
    id          BIGSERIAL PRIMARY KEY,
    source      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    payload     TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    UNIQUE (source, external_id)
);
CREATE INDEX events_received ON events (received_at);
CREATE TABLE deliveries (
    id              BIGSERIAL PRIMARY KEY,
    event_id        BIGINT NOT NULL REFERENCES events(id),
    route           TEXT NOT NULL,
    template        TEXT NOT NULL,
    business_id     BIGINT,
    chat_id         BIGINT,
    text            TEXT,
    state           TEXT NOT NULL,
    reason          TEXT,
    attempts        BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL,
    queued_at       BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    lease_until     BIGINT,
    updated_at      BIGINT NOT NULL,
    delivered_at    BIGINT,
    context_type    TEXT,
    context_id      BIGINT,
    conversation    TEXT,
    claim_token     BIGINT
);
CREATE INDEX deliveries_due ON deliveries (business_id, next_attempt_at, id) WHERE state = 'queued';
CREATE INDEX deliveries_conversation_open ON deliveries (business_id, conversation, id)
    WHERE state IN ('queued', 'sending', 'held');
CREATE INDEX deliveries_leased ON deliveries (lease_until) WHERE state = 'sending';
CREATE INDEX deliveries_sending ON deliveries (business_id) WHERE state = 'sending';
CREATE INDEX deliveries_held ON deliveries (business_id, id) WHERE state = 'held';
CREATE INDEX deliveries_event ON deliveries (event_id);
CREATE INDEX deliveries_state ON deliveries (state, id);
CREATE INDEX deliveries_context ON deliveries (context_id, context_type) WHERE context_id IS NOT NULL;
CREATE TABLE chat_contexts (
    business_id  BIGINT NOT NULL,
    context_type TEXT NOT NULL,
    context_id   BIGINT NOT NULL,
    chat_id      BIGINT NOT NULL,
    found_at     BIGINT NOT NULL,
    PRIMARY KEY (business_id, context_type, context_id)
);
CREATE TABLE attempts (
    id           BIGSERIAL PRIMARY KEY,
    delivery_id  BIGINT NOT NULL REFERENCES deliveries(id),
    business_id  BIGINT NOT NULL,
    method       TEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT NOT NULL,
    latency_ms   BIGINT NOT NULL,
    http_status  INTEGER,
    outcome      TEXT NOT NULL,
    api_errors   TEXT NOT NULL,
    error        TEXT,
    counts_quota BOOLEAN NOT NULL
);
CREATE INDEX attempts_delivery ON attempts (delivery_id, id);
CREATE INDEX attempts_quota ON attempts (business_id, method, finished_at) WHERE counts_quota;
-- Claim tokens (see store/mod.rs `Claimed::claim_token`).
CREATE SEQUENCE claim_tokens;
-- One row per quota-counted Market call, written by the claim (so a crash
-- between send and record keeps the slot), moved to the answer's time by
-- `record`, deleted when the Market did not count the call.
CREATE TABLE quota_slots (
    claim_token BIGINT PRIMARY KEY,
    delivery_id BIGINT NOT NULL,
    business_id BIGINT NOT NULL,
    method      TEXT NOT NULL,
    taken_at    BIGINT NOT NULL
);
CREATE INDEX quota_slots_window ON quota_slots (business_id, method, taken_at);
-- A method's 420 pause, seen by every instance.
CREATE TABLE method_pauses (
    business_id BIGINT NOT NULL,
    method      TEXT NOT NULL,
    until_at    BIGINT NOT NULL,
    PRIMARY KEY (business_id, method)
);

-- migration 2
-- The Market's notifications (as SQLite migration 4): the business a
-- campaign belongs to, the business resolved for an event, and when an
-- event happened to its subject, to spot statuses that arrive late.
CREATE TABLE market_campaigns (
    campaign_id BIGINT PRIMARY KEY,
    business_id BIGINT NOT NULL,
    learnt_at   BIGINT NOT NULL
);
ALTER TABLE events ADD COLUMN business_id BIGINT;
ALTER TABLE events ADD COLUMN subject TEXT;
ALTER TABLE events ADD COLUMN happened_at BIGINT;
CREATE INDEX events_subject ON events (source, subject, happened_at) WHERE subject IS NOT NULL;

-- migration 3
-- `chatbridge store copy` (store/copy): the SQLite database being copied
-- in, by a summary of its contents, and whether the copy finished. A
-- resumed copy must come from the same, unchanged file; `serve` refuses a
-- database whose copy is not finished.
CREATE TABLE store_copies (
    source      TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT
);

-- migration 4
-- Why the Market paused a method: a 420, or X-RateLimit-Resource-Remaining: 0
-- (stored since this migration, so other instances and a restarted one
-- wait for the window too). Rows an older version writes are its 420s.
ALTER TABLE method_pauses ADD COLUMN reason TEXT NOT NULL DEFAULT 'market_420';

-- migration 5
-- The queue's gauges counted from indexes alone (see `open_counts` in
-- postgres.rs): the queued ones by business with their oldest queued time,
-- and the finished-but-stuck ones by business and state. No counter row:
-- every instance writes deliveries, and one row would serialise them.
CREATE INDEX deliveries_queued_since ON deliveries (business_id, queued_at) WHERE state = 'queued';
CREATE INDEX deliveries_stopped ON deliveries (business_id, state)
    WHERE state IN ('dead', 'failed', 'cancelled');

-- migration 6
-- The claim of deliveries whose chat must be found first (as SQLite's
-- migration 9): without it, each claim walked every due delivery of the
-- business, all with chats. Few rows are in it.
CREATE INDEX deliveries_due_lookup ON deliveries (business_id, next_attempt_at, id)
    WHERE state = 'queued' AND chat_id IS NULL;

-- migration 7
-- Fewer index entries per message. PostgreSQL writes a new entry in every
-- index of `deliveries` at each change of state (`state` is in their
-- conditions, so no update is HOT): the listing by state leaves out
-- `sending` (a delivery is there for the length of one call;
-- `deliveries_sending` lists those few), and the two indexes of the
-- sending ones become one (the expired-lease scan reads it whole: it
-- holds at most max_in_flight per business).
DROP INDEX deliveries_state;
CREATE INDEX deliveries_state ON deliveries (state, id) WHERE state <> 'sending';
DROP INDEX deliveries_leased;
DROP INDEX deliveries_sending;
CREATE INDEX deliveries_sending ON deliveries (business_id, lease_until) WHERE state = 'sending';

-- migration 8
-- The quota slots in a window counted per minute, so that a claim adds up
-- at most a window's minutes and counts slots one by one only in the
-- window's first, partial minute: counting every slot of the window cost
-- the claim of a busy business 1.7 ms with 750 slots, at every round.
-- Triggers on quota_slots keep the counts, in the same transaction as the
-- slots (a move within its minute, as most answers make, changes none).
CREATE FUNCTION quota_minute(t BIGINT) RETURNS BIGINT
    LANGUAGE SQL IMMUTABLE AS 'SELECT t - ((t % 60000) + 60000) % 60000';
CREATE TABLE quota_counts (
    business_id BIGINT NOT NULL,
    method      TEXT NOT NULL,
    minute      BIGINT NOT NULL,
    n           BIGINT NOT NULL,
    PRIMARY KEY (business_id, method, minute)
);
INSERT INTO quota_counts (business_id, method, minute, n)
    SELECT business_id, method, quota_minute(taken_at), COUNT(*) FROM quota_slots GROUP BY 1, 2, 3;
CREATE FUNCTION quota_counts_follow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO quota_counts AS c (business_id, method, minute, n)
            SELECT business_id, method, quota_minute(taken_at), COUNT(*) FROM new_slots
            GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            ON CONFLICT (business_id, method, minute) DO UPDATE SET n = c.n + EXCLUDED.n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO quota_counts AS c (business_id, method, minute, n)
            SELECT business_id, method, quota_minute(taken_at), -COUNT(*) FROM old_slots
            GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            ON CONFLICT (business_id, method, minute) DO UPDATE SET n = c.n + EXCLUDED.n;
    ELSE
        INSERT INTO quota_counts AS c (business_id, method, minute, n)
            SELECT business_id, method, minute, SUM(d) FROM (
                SELECT business_id, method, quota_minute(taken_at) AS minute, -1 AS d FROM old_slots
                UNION ALL
                SELECT business_id, method, quota_minute(taken_at), 1 FROM new_slots) moved
            GROUP BY 1, 2, 3 HAVING SUM(d) <> 0 ORDER BY 1, 2, 3
            ON CONFLICT (business_id, method, minute) DO UPDATE SET n = c.n + EXCLUDED.n;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER quota_counts_insert AFTER INSERT ON quota_slots
    REFERENCING NEW TABLE AS new_slots FOR EACH STATEMENT EXECUTE FUNCTION quota_counts_follow();
CREATE TRIGGER quota_counts_update AFTER UPDATE ON quota_slots
    REFERENCING OLD TABLE AS old_slots NEW TABLE AS new_slots
    FOR EACH STATEMENT EXECUTE FUNCTION quota_counts_follow();
CREATE TRIGGER quota_counts_delete AFTER DELETE ON quota_slots
    REFERENCING OLD TABLE AS old_slots FOR EACH STATEMENT EXECUTE FUNCTION quota_counts_follow();

-- migration 9
-- Nothing reads the attempts by business and time (the quota is counted
-- in quota_slots), yet every answer recorded wrote an entry of this
-- index, on the page of its business.
DROP INDEX attempts_quota;
