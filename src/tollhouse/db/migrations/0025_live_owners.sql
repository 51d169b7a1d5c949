-- An organisation's owners must be able to act: a soft-deleted or suspended owner no longer
-- counts towards the "at least one owner" rule, and the owner of record moves to a live
-- owner. Soft-deleting a user checks the rule too (it changed no membership, so the
-- membership trigger never saw it): the sole live owner of an organisation cannot be deleted
-- (409 last_owner) until another owner is made. Both triggers write the tenant row first, so
-- a deletion and a concurrent removal of the other owner queue there, and the second sees
-- the first.
-- The organisation's longest-standing live owner (not deleted, status active) other than
-- p_besides: what both triggers below check for, and the owner of record they move to.
CREATE FUNCTION tollhouse.org_live_owner_v1(p_tenant uuid, p_besides uuid) RETURNS uuid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.user_id FROM tollhouse.tenant_members m
    JOIN tollhouse.users u ON u.id = m.user_id
    WHERE m.tenant_id = p_tenant AND m.role = 'owner' AND m.user_id IS DISTINCT FROM p_besides
      AND u.deleted_at IS NULL AND u.status = 'active'
    ORDER BY m.created_at, m.user_id
    LIMIT 1
$$;
REVOKE ALL ON FUNCTION tollhouse.org_live_owner_v1(uuid, uuid) FROM PUBLIC;

CREATE OR REPLACE FUNCTION tollhouse.tenant_members_owner_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    v_owner uuid;
BEGIN
    UPDATE tollhouse.tenants SET updated_at = now() WHERE id = OLD.tenant_id
    RETURNING is_default, owner_user_id INTO t;
    IF NOT FOUND THEN
        RETURN NULL;  -- the tenant itself is being deleted
    END IF;
    IF t.is_default THEN
        RAISE EXCEPTION 'a personal tenant keeps its owner'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tenant_members_personal_check';
    END IF;
    -- After the change: OLD's member counts only if it is still an owner (a no-op update).
    v_owner := tollhouse.org_live_owner_v1(OLD.tenant_id, NULL);
    IF v_owner IS NULL THEN
        RAISE EXCEPTION 'an organisation keeps at least one owner'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tenant_members_owner_check';
    END IF;
    IF t.owner_user_id = OLD.user_id THEN
        UPDATE tollhouse.tenants SET owner_user_id = v_owner WHERE id = OLD.tenant_id;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION tollhouse.users_owner_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_tenant uuid;
    v_owner uuid;
BEGIN
    FOR v_tenant IN
        SELECT m.tenant_id FROM tollhouse.tenant_members m
        JOIN tollhouse.tenants t ON t.id = m.tenant_id
        WHERE m.user_id = NEW.id AND m.role = 'owner' AND NOT t.is_default
          AND t.deleted_at IS NULL
        ORDER BY m.tenant_id
    LOOP
        UPDATE tollhouse.tenants SET updated_at = now() WHERE id = v_tenant;
        v_owner := tollhouse.org_live_owner_v1(v_tenant, NEW.id);
        IF v_owner IS NULL THEN
            RAISE EXCEPTION 'an organisation keeps at least one owner'
                USING ERRCODE = 'check_violation', CONSTRAINT = 'tenant_members_owner_check';
        END IF;
        UPDATE tollhouse.tenants SET owner_user_id = v_owner
        WHERE id = v_tenant AND owner_user_id = NEW.id;
    END LOOP;
    RETURN NULL;
END
$$;
CREATE TRIGGER users_owner_check AFTER UPDATE OF deleted_at ON tollhouse.users
    FOR EACH ROW WHEN (OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL)
    EXECUTE FUNCTION tollhouse.users_owner_check();
REVOKE ALL ON FUNCTION tollhouse.users_owner_check() FROM PUBLIC;
