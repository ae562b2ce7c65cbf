-- 1: the activity log, its search index and the name registry.
-- Log entries that are delivery attempts (dispatch_*) are here from the
-- start: SQLite added them in its migration 2.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- `seq` is the commit order: appends take it under a lock (see
-- activity.rs), and its sequence caches no values per session (CACHE 1,
-- the default), or two relays would take interleaved ranges. Ids and
-- names sort as bytes, as on SQLite, whatever the database's collation.
CREATE TABLE exchanges (
    seq BIGINT GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    id TEXT COLLATE "C" NOT NULL UNIQUE,
    tunnel TEXT NOT NULL,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    replay_of TEXT,
    received_at BIGINT NOT NULL,
    method TEXT NOT NULL,
    url TEXT NOT NULL,
    http_version TEXT NOT NULL,
    remote_addr TEXT NOT NULL,
    request_headers BYTEA NOT NULL,
    request_body BYTEA NOT NULL,
    request_size BIGINT NOT NULL,
    request_truncated BOOLEAN NOT NULL,
    status INTEGER,
    response_headers BYTEA,
    response_body BYTEA,
    response_size BIGINT,
    response_truncated BOOLEAN,
    responded_at BIGINT,
    done_at BIGINT,
    outcome TEXT NOT NULL,
    error TEXT,
    incomplete BOOLEAN NOT NULL,
    replayed_at BIGINT,
    stored_size BIGINT NOT NULL,
    dispatch_webhook TEXT,
    dispatch_event TEXT,
    dispatch_delivery TEXT,
    dispatch_attempt INTEGER,
    -- What a text search looks in, folded to lowercase: the text SQLite's
    -- index holds, without the owner (the owner column narrows instead).
    search_text TEXT NOT NULL
);
-- Pruning an owner's share sums its sizes from the index alone.
CREATE INDEX exchanges_by_owner ON exchanges (owner, id) INCLUDE (stored_size);
CREATE INDEX exchanges_by_tunnel ON exchanges (tunnel, id);
CREATE INDEX exchanges_by_received ON exchanges (received_at);
CREATE INDEX exchanges_missed ON exchanges (outcome, replayed_at);
CREATE INDEX exchanges_search ON exchanges USING gin (search_text gin_trgm_ops);

CREATE TABLE names (
    name TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT NOT NULL,
    last_seen BIGINT NOT NULL,
    hold_until BIGINT,
    target TEXT
);
