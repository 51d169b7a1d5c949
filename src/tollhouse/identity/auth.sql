-- Sign-in, sessions, single-use tokens and identity linking (tollhouse.identity.auth).

-- name: signin_attempt
SELECT tollhouse.signin_attempt_v1(%(keys)s, %(limit)s, make_interval(secs => %(window)s))

-- name: clear_attempts
DELETE FROM tollhouse.signin_attempts WHERE key = %(key)s

-- name: confirm_password_unchanged
-- Under the row lock, the password verified must still be the current one: a claim, reset
-- or change that committed meanwhile wins over the sign-in in flight (a re-hash of the same
-- password does not change password_changed_at). NO KEY UPDATE, as `lock_user`: a FOR
-- UPDATE lock would also block the foreign-key check of a reset token being made for the
-- user, whose maker holds the user's older token (a deadlock with a password change).
SELECT password_hash IS NOT NULL
       AND password_changed_at IS NOT DISTINCT FROM %(changed_at)s
       AND status = 'active' AND deleted_at IS NULL
FROM tollhouse.users WHERE id = %(user_id)s
FOR NO KEY UPDATE

-- name: refund_attempt
UPDATE tollhouse.signin_attempts SET attempts = attempts - 1
WHERE key = %(key)s AND attempts > 0
  AND window_start = date_bin(make_interval(secs => %(window)s), now(),
                              timestamptz '2000-01-01 00:00:00+00')

-- name: revoke_other_sessions
UPDATE tollhouse.sessions SET revoked_at = now()
WHERE user_id = %(user_id)s AND revoked_at IS NULL
  AND (%(keep)s::uuid IS NULL OR id <> %(keep)s::uuid)

-- name: password_user
-- The account behind an address, with what sign-in needs to decide.
SELECT u.id, u.password_hash, u.status, u.deleted_at IS NOT NULL AS deleted,
       u.password_changed_at
FROM tollhouse.email_routes r
JOIN tollhouse.users u ON u.id = r.user_id
WHERE r.email = %(email)s

-- name: reset_target
-- Who a reset through this address may reach: only an account the address proves. It must
-- be verified there, or be the account's only way in (its sole address, no identity):
-- otherwise a stranger who planted the address could reset into someone else's account, or
-- the address's owner be led into an account a stranger can still open.
SELECT u.id
FROM tollhouse.email_routes r
JOIN tollhouse.users u ON u.id = r.user_id
JOIN tollhouse.user_emails e ON e.user_id = u.id AND e.email = r.email
WHERE r.email = %(email)s AND u.deleted_at IS NULL
  AND (e.verified
       OR (NOT EXISTS (SELECT 1 FROM tollhouse.user_emails o
                       WHERE o.user_id = u.id AND o.email <> r.email)
           AND NOT EXISTS (SELECT 1 FROM tollhouse.user_identities i WHERE i.user_id = u.id)))

-- name: lock_user
-- The per-user lock every change to a user's addresses or credentials takes first.
SELECT id FROM tollhouse.users WHERE id = %(user_id)s FOR NO KEY UPDATE

-- name: user_password
SELECT password_hash, password_changed_at
FROM tollhouse.users WHERE id = %(user_id)s AND deleted_at IS NULL

-- name: session_open
SELECT 1 FROM tollhouse.sessions
WHERE id = %(id)s AND revoked_at IS NULL AND expires_at > now()

-- name: set_password
-- A new password ends every session of the user and every outstanding reset token.
WITH u AS (
    UPDATE tollhouse.users
    SET password_hash = %(password_hash)s, password_changed_at = now(), updated_at = now()
    WHERE id = %(user_id)s
    RETURNING id
), s AS (
    UPDATE tollhouse.sessions SET revoked_at = now()
    WHERE user_id IN (SELECT id FROM u) AND revoked_at IS NULL
      AND (%(keep_session)s::uuid IS NULL OR id <> %(keep_session)s::uuid)
), t AS (
    UPDATE tollhouse.user_tokens SET used_at = now()
    WHERE user_id IN (SELECT id FROM u) AND purpose = 'reset_password' AND used_at IS NULL
)
SELECT id FROM u

-- name: rehash_password
-- Only if the hash is still the one that was verified (a concurrent change wins).
UPDATE tollhouse.users SET password_hash = %(new_hash)s
WHERE id = %(user_id)s AND password_hash = %(old_hash)s

-- name: create_session
INSERT INTO tollhouse.sessions (id, user_id, secret_hash, method, expires_at)
VALUES (%(id)s, %(user_id)s, %(secret_hash)s, %(method)s,
        now() + make_interval(secs => %(ttl)s))
RETURNING id, user_id, method, created_at, authenticated_at, expires_at, last_seen_at

-- name: session
SELECT s.id, s.user_id, s.method, s.created_at, s.authenticated_at, s.expires_at,
       s.last_seen_at, s.secret_hash
FROM tollhouse.sessions s
JOIN tollhouse.users u ON u.id = s.user_id
WHERE s.id = %(id)s AND s.revoked_at IS NULL AND s.expires_at > now()
  AND u.deleted_at IS NULL AND u.status = 'active'

-- name: touch_session
UPDATE tollhouse.sessions SET last_seen_at = now()
WHERE id = %(id)s AND (last_seen_at IS NULL OR last_seen_at < now() - interval '1 minute')

-- name: reauthenticate_session
UPDATE tollhouse.sessions SET authenticated_at = now()
WHERE id = %(id)s AND revoked_at IS NULL
RETURNING id, user_id, method, created_at, authenticated_at, expires_at, last_seen_at

-- name: revoke_session
UPDATE tollhouse.sessions SET revoked_at = now()
WHERE id = %(id)s AND revoked_at IS NULL
RETURNING user_id

-- name: revoke_sessions
UPDATE tollhouse.sessions SET revoked_at = now()
WHERE user_id = %(user_id)s AND revoked_at IS NULL

-- name: seen
UPDATE tollhouse.users SET last_seen_at = now() WHERE id = %(user_id)s

-- name: create_token
-- A new token of a purpose retires the user's older unused ones of that purpose.
WITH old AS (
    UPDATE tollhouse.user_tokens SET used_at = now()
    WHERE user_id = %(user_id)s AND purpose = %(purpose)s AND used_at IS NULL
      AND (%(email)s::text IS NULL OR email = %(email)s)
)
INSERT INTO tollhouse.user_tokens (id, user_id, purpose, email, secret_hash, expires_at)
VALUES (%(id)s, %(user_id)s, %(purpose)s, %(email)s, %(secret_hash)s,
        now() + make_interval(secs => %(ttl)s))
RETURNING expires_at

-- name: token
SELECT user_id, email, secret_hash, used_at IS NOT NULL AS used, expires_at <= now() AS expired
FROM tollhouse.user_tokens
WHERE id = %(id)s AND purpose = %(purpose)s

-- name: use_token
-- Consumes the token at most once: of concurrent users, exactly one gets the row back.
UPDATE tollhouse.user_tokens SET used_at = now()
WHERE id = %(id)s AND used_at IS NULL AND expires_at > now()
RETURNING user_id, email

-- name: remember_nonce
INSERT INTO tollhouse.oidc_nonces (provider, nonce_hash, expires_at)
VALUES (%(provider)s, %(nonce_hash)s, to_timestamp(%(expires_at)s) + interval '5 minutes')
ON CONFLICT DO NOTHING
RETURNING provider

-- name: forget_expired_nonces
DELETE FROM tollhouse.oidc_nonces WHERE expires_at < now()

-- name: identity_owner
SELECT user_id FROM tollhouse.identity_routes WHERE provider = %(provider)s AND subject = %(subject)s

-- name: touch_identity
-- A later sign-in updates last use; an e-mail the provider stops sending is kept.
UPDATE tollhouse.user_identities SET
    last_used_at = now(),
    email = coalesce(%(email)s, email),
    email_verified = CASE WHEN %(email)s::text IS NULL THEN email_verified ELSE %(email_verified)s END
WHERE user_id = %(user_id)s AND provider = %(provider)s AND subject = %(subject)s

-- name: link_identity
WITH route AS (
    INSERT INTO tollhouse.identity_routes (provider, subject, user_id)
    VALUES (%(provider)s, %(subject)s, %(user_id)s)
)
INSERT INTO tollhouse.user_identities
    (user_id, provider, subject, email, email_verified, is_private_email, last_used_at)
VALUES (%(user_id)s, %(provider)s, %(subject)s, %(email)s, %(email_verified)s,
        %(is_private_email)s, now())

-- name: unlink_identity
WITH gone AS (
    DELETE FROM tollhouse.user_identities
    WHERE user_id = %(user_id)s AND provider = %(provider)s AND subject = %(subject)s
    RETURNING provider, subject
), route AS (
    DELETE FROM tollhouse.identity_routes r USING gone
    WHERE r.provider = gone.provider AND r.subject = gone.subject
)
SELECT provider FROM gone

-- name: credentials
-- How a user can sign in, read under a row lock so concurrent unlinks cannot both pass. A
-- password counts only while the user has an address to sign in with.
SELECT u.has_password AND EXISTS (SELECT 1 FROM tollhouse.user_emails e
                                  WHERE e.user_id = u.id) AS password_usable,
       (SELECT count(*) FROM tollhouse.user_identities i WHERE i.user_id = u.id) AS identities,
       (SELECT count(*) FROM tollhouse.user_emails e
        WHERE e.user_id = u.id AND e.verified) AS verified_addresses
FROM tollhouse.users u WHERE u.id = %(user_id)s
FOR UPDATE

-- name: email_owner
-- Who holds an address, whether verified, and what else that user signs in with.
SELECT e.user_id, e.verified, u.has_password,
       (SELECT count(*) FROM tollhouse.user_emails o
        WHERE o.user_id = e.user_id AND o.email <> e.email) AS other_addresses,
       u.deleted_at IS NULL AND u.status = 'active' AS active,
       coalesce((SELECT array_agg(DISTINCT i.provider) FROM tollhouse.user_identities i
                 WHERE i.user_id = e.user_id), '{}') AS providers,
       (SELECT count(*) FROM tollhouse.user_emails v
        WHERE v.user_id = e.user_id AND v.verified) AS verified_addresses
FROM tollhouse.email_routes r
JOIN tollhouse.user_emails e ON e.user_id = r.user_id AND e.email = r.email
JOIN tollhouse.users u ON u.id = e.user_id
WHERE r.email = %(email)s
FOR NO KEY UPDATE OF u

-- name: claim_unverified_account
-- A provider proved ownership of an address that a password account held unverified: the
-- unverified password credential is removed, every session ends, the address is verified.
WITH u AS (
    UPDATE tollhouse.users SET password_hash = NULL, password_changed_at = now(),
                               updated_at = now()
    WHERE id = %(user_id)s
    RETURNING id
), s AS (
    UPDATE tollhouse.sessions SET revoked_at = now()
    WHERE user_id = %(user_id)s AND revoked_at IS NULL
), t AS (
    UPDATE tollhouse.user_tokens SET used_at = now()
    WHERE user_id = %(user_id)s AND used_at IS NULL
)
UPDATE tollhouse.user_emails SET verified = true, verified_at = now()
WHERE user_id = %(user_id)s AND email = %(email)s

-- name: detach_unverified_email
-- The route goes only with the address: a verified address keeps both.
WITH gone AS (
    DELETE FROM tollhouse.user_emails
    WHERE user_id = %(user_id)s AND email = %(email)s AND NOT verified
    RETURNING email, is_primary
), route AS (
    DELETE FROM tollhouse.email_routes r USING gone
    WHERE r.email = gone.email AND r.user_id = %(user_id)s
)
SELECT is_primary FROM gone

-- name: promote_primary
UPDATE tollhouse.user_emails SET is_primary = true
WHERE user_id = %(user_id)s
  AND NOT EXISTS (SELECT 1 FROM tollhouse.user_emails WHERE user_id = %(user_id)s AND is_primary)
  AND email = (SELECT email FROM tollhouse.user_emails WHERE user_id = %(user_id)s
               ORDER BY verified DESC, created_at LIMIT 1)

-- name: forget_old_attempts
DELETE FROM tollhouse.signin_attempts
WHERE window_start < now() - 2 * make_interval(secs => %(window)s)

-- name: remember_apple_notification
-- Once per token id: a repeated delivery returns nothing (and waits for the first's commit).
INSERT INTO tollhouse.apple_notifications (jti, type, subject, event_time, user_id, outcome)
VALUES (%(jti)s, %(type)s, %(subject)s, %(event_time)s, %(user_id)s, %(outcome)s)
ON CONFLICT (jti) DO NOTHING
RETURNING jti

-- name: apple_notification
SELECT type, outcome FROM tollhouse.apple_notifications WHERE jti = %(jti)s

-- name: revoke_apple_sessions
-- The sessions Apple signed in, opened before the event (a sign-in after it is a new consent).
UPDATE tollhouse.sessions SET revoked_at = now()
WHERE user_id = %(user_id)s AND method = 'apple' AND revoked_at IS NULL
  AND created_at <= %(before)s

-- name: set_deliverable
-- Only a newer event than the one that set it counts (Apple does not promise the order).
UPDATE tollhouse.user_emails
SET deliverable = %(deliverable)s, deliverable_as_of = %(at)s
WHERE user_id = %(user_id)s
  AND email = coalesce(%(email)s, (SELECT i.email FROM tollhouse.user_identities i
                                  WHERE i.user_id = %(user_id)s AND i.provider = 'apple'
                                    AND i.subject = %(subject)s))
  AND (deliverable_as_of IS NULL OR deliverable_as_of < %(at)s)

-- name: issue_link_nonce
INSERT INTO tollhouse.identity_link_nonces (user_id, nonce_hash, session_id, expires_at)
VALUES (%(user_id)s, %(nonce_hash)s, %(session_id)s, now() + make_interval(secs => %(ttl)s))
RETURNING expires_at

-- name: use_link_nonce
-- Once, by the session it was given to, before it expires.
UPDATE tollhouse.identity_link_nonces SET used_at = now()
WHERE user_id = %(user_id)s AND nonce_hash = %(nonce_hash)s
  AND session_id = %(session_id)s AND used_at IS NULL AND expires_at > now()
RETURNING true

-- name: forget_expired_link_nonces
DELETE FROM tollhouse.identity_link_nonces WHERE expires_at < now() - interval '1 day'
