-- 4: the fleet's ACME state, so that every relay serves one certificate
-- and any relay's DNS server answers the challenges of the relay ordering.
CREATE TABLE ferry_acme_accounts (
    directory TEXT PRIMARY KEY,
    credentials TEXT NOT NULL
);
CREATE TABLE ferry_acme_certificates (
    domain TEXT PRIMARY KEY,
    cert TEXT NOT NULL,
    key TEXT NOT NULL,
    issued_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Open DNS-01 challenges; a relay that dies mid-order leaves its rows to
-- expire rather than to be served forever.
CREATE TABLE ferry_acme_challenges (
    id BIGSERIAL PRIMARY KEY,
    domain TEXT NOT NULL,
    value TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX ferry_acme_challenges_domain ON ferry_acme_challenges (domain);
-- Each relay's DNS server: the last challenge it has loaded, and until when
-- it counts as running, so the ordering relay can wait for all of them.
CREATE TABLE ferry_acme_mirrors (
    relay TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    seen BIGINT NOT NULL,
    alive_until TIMESTAMPTZ NOT NULL
);
-- The fleet's failed orders per domain and when the next may be made, so
-- that relays taking turns do not each fail against the CA's limits.
CREATE TABLE ferry_acme_orders (
    domain TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    next_at TIMESTAMPTZ NOT NULL
);
