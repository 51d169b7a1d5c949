-- Organisations (tollhouse.orgs). Every change locks the tenant row first, so changes to one
-- organisation's members and invitations happen one at a time, and checks the acting user's
-- role after that lock, in the same transaction as the write.

-- name: create
WITH t AS (
    INSERT INTO tollhouse.tenants (id, name, slug, logo_url, owner_user_id, is_default)
    SELECT %(id)s, %(name)s, %(slug)s, %(logo_url)s, u.id, false
    FROM tollhouse.users u WHERE u.id = %(owner)s AND u.deleted_at IS NULL
    RETURNING *
), m AS (
    INSERT INTO tollhouse.tenant_members (tenant_id, user_id, role)
    SELECT id, owner_user_id, 'owner' FROM t
)
SELECT t.id, t.name, t.slug, t.logo_url, t.owner_user_id, t.is_default, t.created_at,
       t.updated_at, t.deleted_at, 'owner' AS role
FROM t

-- name: lock
-- The tenant, locked for a change of its members or settings (NO KEY UPDATE: debits and
-- foreign keys only take KEY SHARE on it). The actor's role is read by the next statement,
-- whose snapshot is taken after the lock: a subquery here would read the old one.
SELECT t.id, t.is_default, t.deleted_at IS NOT NULL AS deleted
FROM tollhouse.tenants t WHERE t.id = %(id)s
FOR NO KEY UPDATE OF t

-- name: lock_account
SELECT 1 FROM tollhouse.credit_accounts WHERE tenant_id = %(id)s FOR UPDATE

-- name: get
SELECT t.id, t.name, t.slug, t.logo_url, t.owner_user_id, t.is_default, t.created_at,
       t.updated_at, t.deleted_at,
       (SELECT m.role FROM tollhouse.tenant_members m
        WHERE m.tenant_id = t.id AND m.user_id = %(actor)s) AS role
FROM tollhouse.tenants t WHERE t.id = %(id)s

-- name: for_user
SELECT t.id, t.name, t.slug, t.logo_url, t.owner_user_id, t.is_default, t.created_at,
       t.updated_at, t.deleted_at, m.role
FROM tollhouse.tenant_members m JOIN tollhouse.tenants t ON t.id = m.tenant_id
WHERE m.user_id = %(user_id)s AND NOT t.is_default AND t.deleted_at IS NULL
ORDER BY t.created_at, t.id

-- name: update
UPDATE tollhouse.tenants
SET name = coalesce(%(name)s, name), slug = coalesce(%(slug)s, slug),
    logo_url = CASE WHEN %(set_logo)s THEN %(logo_url)s ELSE logo_url END, updated_at = now()
WHERE id = %(id)s

-- name: set_deleted
UPDATE tollhouse.tenants
SET deleted_at = CASE WHEN %(deleted)s THEN now() END, updated_at = now()
WHERE id = %(id)s

-- name: members
SELECT m.tenant_id, m.user_id, m.role, m.created_at,
       (SELECT e.email FROM tollhouse.user_emails e
        WHERE e.user_id = m.user_id AND e.is_primary) AS email,
       u.display_name,
       coalesce(l.credit_limit, -1) AS credit_limit,
       CASE WHEN l.period_start IS NOT DISTINCT FROM a.period_start
            THEN coalesce(l.used_credits, 0) ELSE 0 END AS used_credits
FROM tollhouse.tenant_members m
JOIN tollhouse.users u ON u.id = m.user_id
LEFT JOIN tollhouse.tenant_member_credit_limits l
       ON l.tenant_id = m.tenant_id AND l.user_id = m.user_id
LEFT JOIN tollhouse.credit_accounts a ON a.tenant_id = m.tenant_id
WHERE m.tenant_id = %(id)s AND (%(user_id)s::uuid IS NULL OR m.user_id = %(user_id)s::uuid)
ORDER BY m.created_at, m.user_id

-- name: member_role
SELECT role FROM tollhouse.tenant_members WHERE tenant_id = %(id)s AND user_id = %(user_id)s

-- name: add_member
INSERT INTO tollhouse.tenant_members (tenant_id, user_id, role)
SELECT %(id)s, u.id, %(role)s FROM tollhouse.users u
WHERE u.id = %(user_id)s AND u.deleted_at IS NULL
ON CONFLICT (tenant_id, user_id) DO NOTHING
RETURNING user_id

-- name: user_live
SELECT EXISTS (SELECT 1 FROM tollhouse.users
               WHERE id = %(user_id)s AND deleted_at IS NULL AND status = 'active')

-- name: user_exists
SELECT EXISTS (SELECT 1 FROM tollhouse.users WHERE id = %(user_id)s AND deleted_at IS NULL)

-- name: set_role
UPDATE tollhouse.tenant_members SET updated_at = now(), role = %(role)s
WHERE tenant_id = %(id)s AND user_id = %(user_id)s

-- name: set_owner
UPDATE tollhouse.tenants SET owner_user_id = %(user_id)s, updated_at = now() WHERE id = %(id)s

-- name: remove_member
DELETE FROM tollhouse.tenant_members WHERE tenant_id = %(id)s AND user_id = %(user_id)s

-- name: set_limit
UPDATE tollhouse.tenant_member_credit_limits
SET credit_limit = %(credit_limit)s, updated_at = now()
WHERE tenant_id = %(id)s AND user_id = %(user_id)s

-- name: member_is_invitee
-- Whether an address belongs to a member already (any of the member's addresses).
SELECT EXISTS (
    SELECT 1 FROM tollhouse.tenant_members m
    JOIN tollhouse.user_emails e ON e.user_id = m.user_id
    WHERE m.tenant_id = %(id)s AND e.email = %(email)s)

-- name: revoke_pending
-- Inviting an address again replaces its pending invitation: the older token dies (one
-- already past its expiry is recorded as expired).
UPDATE tollhouse.tenant_invitations
SET status = CASE WHEN expires_at <= now() THEN 'expired' ELSE 'revoked' END,
    updated_at = now()
WHERE tenant_id = %(id)s AND email = %(email)s AND status = 'pending'

-- name: invite
WITH i AS (
    INSERT INTO tollhouse.tenant_invitations
        (tenant_id, id, email, role, credit_limit, invited_by, selector, secret_hash,
         expires_at)
    VALUES (%(id)s, %(invitation_id)s, %(email)s, %(role)s, %(credit_limit)s, %(actor)s,
            %(selector)s, %(secret_hash)s, now() + %(ttl)s)
    RETURNING *
), r AS (
    INSERT INTO tollhouse.invitation_routes (selector, tenant_id, invitation_id)
    SELECT selector, tenant_id, id FROM i
)
SELECT tenant_id, id, email, role, credit_limit, invited_by, status, expires_at, created_at,
       accepted_at, accepted_by
FROM i

-- name: invitations
SELECT tenant_id, id, email, role, credit_limit, invited_by,
       CASE WHEN status = 'pending' AND expires_at <= now() THEN 'expired'
            ELSE status END AS status,
       expires_at, created_at, accepted_at, accepted_by
FROM tollhouse.tenant_invitations
WHERE tenant_id = %(id)s AND (%(invitation_id)s::uuid IS NULL OR id = %(invitation_id)s::uuid)
ORDER BY created_at DESC, id DESC

-- name: credit_limit_of
SELECT credit_limit FROM tollhouse.tenant_member_credit_limits
WHERE tenant_id = %(id)s AND user_id = %(user_id)s

-- name: invitation_for_update
SELECT tenant_id, id, email, role, credit_limit, invited_by, selector, secret_hash, status,
       status = 'pending' AND expires_at <= now() AS expired
FROM tollhouse.tenant_invitations
WHERE tenant_id = %(id)s AND id = %(invitation_id)s
FOR UPDATE

-- name: rotate
-- Resend: a new token (the old one stops working) and a new expiry.
WITH old AS (
    DELETE FROM tollhouse.invitation_routes WHERE selector = %(old_selector)s
), r AS (
    INSERT INTO tollhouse.invitation_routes (selector, tenant_id, invitation_id)
    VALUES (%(selector)s, %(id)s, %(invitation_id)s)
)
UPDATE tollhouse.tenant_invitations
SET selector = %(selector)s, secret_hash = %(secret_hash)s, expires_at = now() + %(ttl)s,
    updated_at = now()
WHERE tenant_id = %(id)s AND id = %(invitation_id)s

-- name: set_invitation_status
UPDATE tollhouse.tenant_invitations
SET status = %(status)s, updated_at = now(),
    accepted_at = CASE WHEN %(status)s = 'accepted' THEN now() END,
    accepted_by = %(accepted_by)s
WHERE tenant_id = %(id)s AND id = %(invitation_id)s

-- name: route
SELECT tenant_id, invitation_id FROM tollhouse.invitation_routes WHERE selector = %(selector)s

-- name: verified_email
SELECT EXISTS (SELECT 1 FROM tollhouse.user_emails
               WHERE user_id = %(user_id)s AND email = %(email)s AND verified)
