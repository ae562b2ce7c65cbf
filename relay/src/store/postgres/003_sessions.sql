-- 3: the live-session registry: which relay of the fleet serves which
-- tunnel name, as a lease its heartbeat renews. Times are the database's
-- clock, so relays whose clocks disagree still agree on who holds a name.
CREATE TABLE ferry_sessions (
    name TEXT PRIMARY KEY,
    relay TEXT NOT NULL,
    url TEXT NOT NULL,
    owner TEXT NOT NULL,
    session BIGINT NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL
);
CREATE INDEX ferry_sessions_relay ON ferry_sessions (relay);
