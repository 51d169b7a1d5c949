-- Nonces for explicit linking bound to the session that asked for them (RELIABILITY A-08):
-- an ID token linked with one must carry a nonce this session was given, so a request forged
-- in the victim's browser cannot link the forger's Google or Apple account (its token carries
-- a nonce of the forger's). Only a hash is stored; each is used once, within 10 minutes.
CREATE TABLE tollhouse.identity_link_nonces (
    user_id uuid NOT NULL,
    nonce_hash bytea NOT NULL,
    session_id uuid NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at timestamptz,
    CONSTRAINT identity_link_nonces_pkey PRIMARY KEY (user_id, nonce_hash),
    CONSTRAINT identity_link_nonces_user_id_fkey FOREIGN KEY (user_id)
        REFERENCES tollhouse.users (id) ON DELETE CASCADE
);
CREATE INDEX identity_link_nonces_expires_idx ON tollhouse.identity_link_nonces (expires_at);

ALTER TABLE tollhouse.identity_link_nonces ENABLE ROW LEVEL SECURITY;
ALTER TABLE tollhouse.identity_link_nonces FORCE ROW LEVEL SECURITY;
CREATE POLICY identity_link_nonces_service ON tollhouse.identity_link_nonces
    TO tollhouse_service USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON tollhouse.identity_link_nonces TO tollhouse_service;
