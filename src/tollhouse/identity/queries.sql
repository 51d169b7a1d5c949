-- Identity (tollhouse.identity). Every write that must hold together is one statement.

-- name: create_user
-- The user, its primary e-mail and route, preferences, role and personal tenant, at once.
WITH u AS (
    INSERT INTO tollhouse.users
        (id, display_name, first_name, last_name, password_hash, password_changed_at)
    VALUES (%(id)s, %(display_name)s, %(first_name)s, %(last_name)s, %(password_hash)s,
            CASE WHEN %(password_hash)s::text IS NULL THEN NULL ELSE now() END)
    RETURNING id
), route AS (
    INSERT INTO tollhouse.email_routes (email, user_id)
    SELECT %(email)s, id FROM u WHERE %(email)s::text IS NOT NULL
), email AS (
    INSERT INTO tollhouse.user_emails (user_id, email, is_primary, verified, via, verified_at)
    SELECT id, %(email)s, true, %(verified)s, %(via)s,
           CASE WHEN %(verified)s THEN now() END
    FROM u WHERE %(email)s::text IS NOT NULL
), prefs AS (
    INSERT INTO tollhouse.user_email_preferences (user_id) SELECT id FROM u
), role AS (
    INSERT INTO tollhouse.user_roles (user_id, role) SELECT id, 'user' FROM u
), tenant AS (
    INSERT INTO tollhouse.tenants (id, name, owner_user_id, is_default)
    SELECT %(tenant_id)s, 'Personal', id, true FROM u
), member AS (
    INSERT INTO tollhouse.tenant_members (tenant_id, user_id, role)
    SELECT %(tenant_id)s, id, 'owner' FROM u
)
SELECT id FROM u

-- name: user
-- One user with its e-mails, identities, roles and personal tenant; RLS applies as usual.
SELECT u.id, u.display_name, u.first_name, u.last_name, u.username, u.avatar_url, u.status,
       u.is_internal, u.plan_override, u.metadata, u.created_at, u.updated_at,
       u.last_seen_at, u.deleted_at, u.has_password,
       (SELECT t.id FROM tollhouse.tenants t
        WHERE t.owner_user_id = u.id AND t.is_default) AS personal_tenant_id,
       (SELECT tollhouse.billing_plan_v1(t.id) FROM tollhouse.tenants t
        WHERE t.owner_user_id = u.id AND t.is_default) AS billing_plan,
       coalesce((SELECT json_agg(json_build_object(
                    'email', e.email, 'is_primary', e.is_primary, 'verified', e.verified,
                    'via', e.via, 'created_at', e.created_at, 'verified_at', e.verified_at,
                    'deliverable', e.deliverable)
                    ORDER BY e.is_primary DESC, e.created_at)
                 FROM tollhouse.user_emails e WHERE e.user_id = u.id), '[]') AS emails,
       coalesce((SELECT json_agg(json_build_object(
                    'provider', i.provider, 'subject', i.subject, 'email', i.email,
                    'email_verified', i.email_verified, 'is_private_email', i.is_private_email,
                    'created_at', i.created_at, 'last_used_at', i.last_used_at)
                    ORDER BY i.created_at)
                 FROM tollhouse.user_identities i WHERE i.user_id = u.id), '[]') AS identities,
       coalesce((SELECT array_agg(r.role ORDER BY r.role)
                 FROM tollhouse.user_roles r WHERE r.user_id = u.id), '{}') AS roles
FROM tollhouse.users u
WHERE u.id = %(id)s AND (%(include_deleted)s OR u.deleted_at IS NULL)

-- name: user_id_by_email
SELECT user_id FROM tollhouse.email_routes WHERE email = %(email)s

-- name: user_id_by_identity
SELECT user_id FROM tollhouse.identity_routes WHERE provider = %(provider)s AND subject = %(subject)s

-- name: update_user
-- Only the fields named in %(fields)s change; the others keep their value.
UPDATE tollhouse.users SET
    display_name = CASE WHEN 'display_name' = ANY(%(fields)s) THEN %(display_name)s ELSE display_name END,
    first_name = CASE WHEN 'first_name' = ANY(%(fields)s) THEN %(first_name)s ELSE first_name END,
    last_name = CASE WHEN 'last_name' = ANY(%(fields)s) THEN %(last_name)s ELSE last_name END,
    username = CASE WHEN 'username' = ANY(%(fields)s) THEN %(username)s ELSE username END,
    avatar_url = CASE WHEN 'avatar_url' = ANY(%(fields)s) THEN %(avatar_url)s ELSE avatar_url END,
    status = CASE WHEN 'status' = ANY(%(fields)s) THEN %(status)s ELSE status END,
    is_internal = CASE WHEN 'is_internal' = ANY(%(fields)s) THEN %(is_internal)s ELSE is_internal END,
    plan_override = CASE WHEN 'plan_override' = ANY(%(fields)s) THEN %(plan_override)s ELSE plan_override END,
    metadata = CASE WHEN 'metadata' = ANY(%(fields)s) THEN %(metadata)s ELSE metadata END,
    updated_at = now()
WHERE id = %(id)s AND deleted_at IS NULL
RETURNING id

-- name: update_own_profile
-- Run as the end-user role: RLS and column grants limit it to the caller's own profile.
UPDATE tollhouse.users SET
    display_name = CASE WHEN 'display_name' = ANY(%(fields)s) THEN %(display_name)s ELSE display_name END,
    first_name = CASE WHEN 'first_name' = ANY(%(fields)s) THEN %(first_name)s ELSE first_name END,
    last_name = CASE WHEN 'last_name' = ANY(%(fields)s) THEN %(last_name)s ELSE last_name END,
    username = CASE WHEN 'username' = ANY(%(fields)s) THEN %(username)s ELSE username END,
    avatar_url = CASE WHEN 'avatar_url' = ANY(%(fields)s) THEN %(avatar_url)s ELSE avatar_url END,
    updated_at = now()
WHERE id = tollhouse.current_user_id()
RETURNING id

-- name: soft_delete_user
-- Soft delete: the row stays, sessions end, the user cannot sign in until restored.
WITH u AS (
    UPDATE tollhouse.users SET deleted_at = now(), updated_at = now()
    WHERE id = %(id)s AND deleted_at IS NULL
    RETURNING id
), s AS (
    UPDATE tollhouse.sessions SET revoked_at = now()
    WHERE user_id IN (SELECT id FROM u) AND revoked_at IS NULL
)
SELECT id FROM u

-- name: restore_user
UPDATE tollhouse.users SET deleted_at = NULL, updated_at = now()
WHERE id = %(id)s AND deleted_at IS NOT NULL
RETURNING id

-- name: add_email
WITH route AS (
    INSERT INTO tollhouse.email_routes (email, user_id) VALUES (%(email)s, %(user_id)s)
)
INSERT INTO tollhouse.user_emails (user_id, email, is_primary, verified, via, verified_at)
SELECT %(user_id)s, %(email)s,
       NOT EXISTS (SELECT 1 FROM tollhouse.user_emails WHERE user_id = %(user_id)s),
       %(verified)s, %(via)s, CASE WHEN %(verified)s THEN now() END
RETURNING email

-- name: remove_email
WITH gone AS (
    DELETE FROM tollhouse.user_emails
    WHERE user_id = %(user_id)s AND email = %(email)s AND NOT is_primary
    RETURNING email
), route AS (
    DELETE FROM tollhouse.email_routes
    WHERE email IN (SELECT email FROM gone) AND user_id = %(user_id)s
)
SELECT email FROM gone

-- name: lock_user
-- The per-user lock every change to a user's addresses takes first.
SELECT id FROM tollhouse.users WHERE id = %(user_id)s FOR NO KEY UPDATE

-- name: email_state
-- Locks all of the user's addresses, so concurrent changes to them take turns and never
-- leave zero or two primaries.
SELECT email, is_primary, verified FROM tollhouse.user_emails
WHERE user_id = %(user_id)s
FOR UPDATE

-- name: make_primary
-- One statement swaps the flag, so there is never a moment with zero or two primaries.
UPDATE tollhouse.user_emails SET is_primary = (email = %(email)s)
WHERE user_id = %(user_id)s
  AND EXISTS (SELECT 1 FROM tollhouse.user_emails
              WHERE user_id = %(user_id)s AND email = %(email)s AND verified)
RETURNING email

-- name: mark_email_verified
UPDATE tollhouse.user_emails SET verified = true, verified_at = coalesce(verified_at, now())
WHERE user_id = %(user_id)s AND email = %(email)s
RETURNING email

-- name: grant_role
INSERT INTO tollhouse.user_roles (user_id, role) VALUES (%(user_id)s, %(role)s)
ON CONFLICT DO NOTHING

-- name: revoke_role
DELETE FROM tollhouse.user_roles WHERE user_id = %(user_id)s AND role = %(role)s

-- name: preferences
SELECT marketing, product_updates, payment_receipts, updated_at
FROM tollhouse.user_email_preferences WHERE user_id = %(user_id)s

-- name: update_preferences
UPDATE tollhouse.user_email_preferences SET
    marketing = coalesce(%(marketing)s, marketing),
    product_updates = coalesce(%(product_updates)s, product_updates),
    payment_receipts = coalesce(%(payment_receipts)s, payment_receipts),
    updated_at = now()
WHERE user_id = %(user_id)s
RETURNING marketing, product_updates, payment_receipts, updated_at

-- name: sessions_of
SELECT id, user_id, method, created_at, authenticated_at, expires_at, last_seen_at
FROM tollhouse.sessions
WHERE user_id = %(user_id)s AND revoked_at IS NULL AND expires_at > now()
ORDER BY created_at DESC

-- name: record_event
INSERT INTO tollhouse.identity_events (user_id, id, kind, detail)
VALUES (%(user_id)s, %(id)s, %(kind)s, %(detail)s)
