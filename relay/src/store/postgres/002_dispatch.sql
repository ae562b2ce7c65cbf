-- 2: the dispatcher: webhooks, event types, events, the delivery queue and its attempts.
-- The same tables and columns as SQLite's; times are microseconds since the
-- Unix epoch (BIGINT), as everywhere in the store.
CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    method TEXT NOT NULL,
    url TEXT NOT NULL,
    actions JSONB NOT NULL,
    headers JSONB NOT NULL,
    enabled BOOLEAN NOT NULL,
    ordered BOOLEAN NOT NULL,
    secret TEXT NOT NULL,
    previous_secret TEXT,
    previous_until BIGINT,
    disabled_reason TEXT,
    failing_since BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX webhooks_by_owner ON webhooks (owner, created_at);
CREATE TABLE event_types (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    example TEXT NOT NULL,
    PRIMARY KEY (owner, name)
);
CREATE TABLE events (
    key BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner TEXT NOT NULL,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    payload BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX events_by_id ON events (owner, id, created_at);
CREATE INDEX events_by_age ON events (created_at);
CREATE TABLE deliveries (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    webhook_id TEXT NOT NULL,
    event BIGINT NOT NULL,
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    max_attempts BIGINT NOT NULL,
    next_at BIGINT NOT NULL,
    leased_until BIGINT,
    last_status INTEGER,
    last_error TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX deliveries_pending_by_webhook ON deliveries (webhook_id, seq)
    WHERE state = 'pending';
-- When a webhook's next delivery is due, read in order of due time.
CREATE INDEX deliveries_due_by_webhook ON deliveries (webhook_id, next_at)
    WHERE state = 'pending';
-- The few deliveries in flight (or whose attempt died): what keeps an
-- ordered webhook to one at a time, found without reading its backlog.
CREATE INDEX deliveries_leased_by_webhook ON deliveries (webhook_id)
    WHERE state = 'pending' AND leased_until IS NOT NULL;
CREATE INDEX deliveries_by_webhook ON deliveries (webhook_id, seq);
CREATE INDEX deliveries_by_event ON deliveries (event);
CREATE INDEX deliveries_by_age ON deliveries (created_at);
CREATE TABLE delivery_attempts (
    delivery BIGINT NOT NULL,
    number BIGINT NOT NULL,
    at BIGINT NOT NULL,
    status INTEGER,
    error TEXT,
    duration_ms BIGINT NOT NULL,
    exchange_id TEXT NOT NULL,
    PRIMARY KEY (delivery, number)
);
